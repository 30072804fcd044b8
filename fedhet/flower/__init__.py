"""Flower interoperability (filled in below)."""
