"""What this device can do: a short training benchmark for its speed, and its memory."""

from __future__ import annotations

import os
import time

import torch

from fedhet.clients.trainer import ClientState, LocalTrainer
from fedhet.types import Task

__all__ = ["detect_memory_bytes", "measure_seconds_per_sample"]


def measure_seconds_per_sample(trainer: LocalTrainer, x: torch.Tensor, y: torch.Tensor, steps: int = 5) -> float:
    """Seconds per training sample (forward + backward + step) of ``trainer`` on this device.

    Runs one warm-up step, then ``steps`` timed minibatch steps of the trainer's batch size on ``(x, y)``, starting
    from the trainer's current model; the model's weights are restored afterwards. A DP trainer is timed with its
    DP-SGD steps, on a throwaway client state (no real budget is spent).
    """
    if steps < 1:
        raise ValueError(f"benchmark steps must be >= 1, got {steps}")
    saved = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    try:
        trainer.train(Task(0, 0, 0, saved, local_steps=1), x, y, seed=0, state=ClientState())
        start = time.perf_counter()
        result = trainer.train(Task(1, 0, 0, saved, local_steps=steps), x, y, seed=0, state=ClientState())
        elapsed = time.perf_counter() - start
    finally:
        trainer.model.load_state_dict(saved)
    samples = result.local_steps * min(trainer.config.batch_size, len(x))
    return max(elapsed / samples, 1e-9)


def detect_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device`` in bytes: the GPU's for CUDA, physical RAM otherwise (0 when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0
