"""fedhet's quantization-aware step against the peers' ways of training at int8, measured in one run.

Issue 17 asks whether torchao (its int8 mixed-precision training: int8 GEMMs with dynamic row-wise scales in the
forward and backward passes, and its int8 weight-only training) or ``torch.compile`` makes a client's quantized step
faster than fedhet's own int8 path (:mod:`fedhet.clients.quantized`). For the FedAvg CNN and 2NN this times one SGD
step of each variant against fp32 eager, interleaved round by round (the same timing as
``benchmarks/quantized_step.py``), and prints each one's speed against fp32 eager:

- ``fedhet int8``: :func:`fedhet.clients.quantized.quantize_model` at 8 bits (what an int8 client trains);
- ``torchao int8 mixed`` / ``torchao int8 weight-only``: torchao's ``quantize_`` with
  ``int8_mixed_precision_training()`` / ``int8_weight_only_quantized_training()`` (Linear layers only; torchao
  leaves convolutions in fp32), eager and, with ``--compile``, under ``torch.compile``;
- ``fp32 compiled`` (with ``--compile``): the fp32 model under ``torch.compile``, the compiler's own gain.

It starts with the GEMMs themselves at the CNN's shapes: fp32, bf16 and ``torch._int_mm`` (int8 in, int32 out), the
margin any int8 step can draw on.

torchao is not one of fedhet's dependencies (it lost here; see docs/scale.md): ``pip install torchao`` to run its rows.

    python benchmarks/quantized_peers.py [--rounds 30] [--threads 1] [--device cpu|cuda] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import warnings
from collections.abc import Callable
from functools import partial

import torch
from quantized_step import SHAPE, interleaved, make_step
from torch import nn

from fedhet.clients.quantized import quantize_model, set_bitwidth
from fedhet.models import build_model


def torchao_variants(model: nn.Module, compile_too: bool) -> dict[str, nn.Module]:
    """torchao's int8 training recipes applied to copies of ``model`` (empty when torchao is not installed)."""
    if importlib.util.find_spec("torchao") is None:
        return {}
    from torchao.prototype.quantized_training import (
        int8_mixed_precision_training,
        int8_weight_only_quantized_training,
    )
    from torchao.quantization import quantize_

    out: dict[str, nn.Module] = {}
    for label, config in (
        ("torchao int8 mixed", int8_mixed_precision_training),
        ("torchao int8 weight-only", int8_weight_only_quantized_training),
    ):
        quantized = copy.deepcopy(model)
        quantize_(quantized, config())
        out[label] = quantized
        if compile_too:
            out[f"{label} compiled"] = torch.compile(copy.deepcopy(quantized))
    return out


#: (rows, reduction, columns, what) of the CNN's GEMMs: its second convolution as an im2col GEMM, its first Linear
GEMM_SHAPES = (
    (50176, 800, 64, "cnn conv2 forward, minibatch 256"),
    (6272, 800, 64, "cnn conv2 forward, minibatch 32"),
    (256, 3136, 512, "cnn fc1 forward, minibatch 256"),
    (32, 3136, 512, "cnn fc1 forward, minibatch 32"),
)


def gemm_margins(rounds: int, device: torch.device) -> None:
    """fp32, bf16 and int8 GEMMs at :data:`GEMM_SHAPES`, timed interleaved; ratios to fp32 and to bf16."""
    print(f"\nGEMMs at the CNN's shapes, min of {rounds} interleaved rounds")
    for rows, reduction, columns, what in GEMM_SHAPES:
        a, b = torch.randn(rows, reduction, device=device), torch.randn(reduction, columns, device=device)
        ai = torch.randint(-127, 128, (rows, reduction), dtype=torch.int8, device=device)
        bi = torch.randint(-127, 128, (reduction, columns), dtype=torch.int8, device=device)
        ab, bb = a.bfloat16(), b.bfloat16()
        gemms = {
            "fp32": partial(torch.mm, a, b),
            "bf16": partial(torch.mm, ab, bb),
            "int8": partial(torch._int_mm, ai, bi),
        }
        times = interleaved(gemms, rounds, device)
        fp32, bf16, int8 = (min(times[k]) * 1e3 for k in ("fp32", "bf16", "int8"))
        print(f"  {what:34s} fp32 {fp32:7.2f} ms  bf16 {bf16:7.2f} ({fp32 / bf16:.2f}x)  int8 {int8:7.2f} "
              f"({fp32 / int8:.2f}x fp32, {bf16 / int8:.2f}x bf16)")  # fmt: skip


def compare(name: str, batch: int, rounds: int, device: torch.device, compile_too: bool) -> None:
    """Times one SGD step of every variant of model ``name`` at minibatch ``batch``; prints each against fp32 eager."""
    model = build_model(name, SHAPE, 10, seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *SHAPE, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    int8 = quantize_model(model)
    set_bitwidth(int8, 8)
    models: dict[str, nn.Module] = {"fp32": copy.deepcopy(model), "fedhet int8": int8}
    if compile_too:
        models["fp32 compiled"] = torch.compile(copy.deepcopy(model))
    models.update(torchao_variants(model, compile_too))
    steps: dict[str, Callable[[], object]] = {k: make_step(m, x, y, autocast=False) for k, m in models.items()}
    times = interleaved(steps, rounds, device)
    base = min(times["fp32"])
    print(f"\n{name}: one SGD step, minibatch {batch}, {rounds} interleaved rounds")
    print(f"  {'variant':32s} {'min ms':>8s}  speed vs fp32 eager")
    for label, seconds in times.items():
        print(f"  {label:32s} {min(seconds) * 1e3:8.2f}  {base / min(seconds):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # torchao's deprecation notices
    device = torch.device(args.device)
    installed = importlib.util.find_spec("torchao") is not None
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, torchao "
          f"{'installed' if installed else 'not installed (pip install torchao for its rows)'}")  # fmt: skip
    gemm_margins(min(args.rounds, 10), device)
    for name in ("2nn", "cnn"):
        for batch in (32, 256):
            compare(name, batch, args.rounds, device, args.compile)


if __name__ == "__main__":
    main()
