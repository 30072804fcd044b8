"""How fast a quantized step of a Linear/ReLU network (the 2NN) can be on this machine, measured in one run.

Issue 17 asks for int8 and bf16 steps of the 2NN >= 1.5x fp32 at minibatch 32 on the 2-core CPU. fedhet's step is
0.66x there and ``torch.compile`` does not help (docs/scale.md), so this asks what a step written out by hand can
do: no autograd, no module calls, one fused update. For a ``nn.Sequential`` of Flatten, Linear and ReLU layers it
times one SGD step (forward, cross-entropy, backward, update) of each variant against fp32 eager (the baseline of
``benchmarks/quantized_step.py``), interleaved round by round:

- ``int8 QAT``: fedhet's quantization-aware step (:func:`fedhet.clients.quantized.quantize_model` at 8 bits);
- ``manual fp32``: the step written out in fp32: what removing the framework's overhead alone gains;
- ``manual int8``: the step written out with fedhet's int8 numerics: each layer on the path
  :func:`~fedhet.clients.quantized.choose_path` picks (int8 GEMMs with row-quantized activations and gradients, or
  fake-quantized weights), its weights rounded to 8 bits every step, as training must (they change every step);
- ``manual int8, no rounding``: the same with the weights rounded once before timing and never again: no training
  step can do this; it is the bound that rounding the weights every step leaves;
- ``manual bf16``: the step written out with bf16 GEMMs (fp32 master weights, bf16 activations).

Before timing it checks that the manual int8 step is the QAT step (one step from the same weights: loss and every
updated weight equal up to float rounding), and after it prints, per layer, what rounding its weights costs against
the fp32 GEMM of its forward pass.

    python benchmarks/quantized_bound.py [--rounds 200] [--threads 1] [--batches 32 256] [--model 2nn]
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from quantized_step import SHAPE, interleaved, make_step
from torch import nn

from fedhet import quant
from fedhet.clients.quantized import choose_path, quantize_model, quantize_rows, set_bitwidth
from fedhet.models import build_model

BITS = 8
LR = 0.05


class ManualStep:
    """One SGD step of a Flatten/Linear/ReLU stack, written out. ``mode`` is ``fp32``, ``bf16`` or ``int8`` (the
    quantization-aware numerics of :mod:`fedhet.clients.quantized` at :data:`BITS` bits); ``round_weights`` False
    (int8 only) rounds the weights once here and never again."""

    def __init__(self, model: nn.Module, batch: int, mode: str, round_weights: bool = True) -> None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        kinds = [type(m) for m in model.children()]
        if kinds != [nn.Flatten] + [nn.Linear, nn.ReLU] * (len(linears) - 1) + [nn.Linear]:
            raise ValueError(f"a Flatten, Linear, ReLU, ..., Linear stack is needed, got {kinds}")
        self.weights = [m.weight.detach().clone() for m in linears]
        self.biases = [m.bias.detach().clone() for m in linears]
        self.mode = mode
        self.paths = [
            choose_path(m, BITS, batch * m.in_features * m.out_features) if mode == "int8" else mode for m in linears
        ]
        self.rounded = [self._round(i) for i in range(len(linears))] if not round_weights else None

    def _round(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s weights as its path uses them: (int8 values, scales) or (fake-quantized weights, unused)."""
        if self.paths[i] == "int8":
            return quant.quantize(self.weights[i], BITS, check_finite=False)
        if self.paths[i] == "fake":
            return quant.fake_quantize(self.weights[i], BITS, check_finite=False), self.biases[i]
        if self.paths[i] == "bf16":
            return self.weights[i].to(torch.bfloat16), self.biases[i].to(torch.bfloat16)
        return self.weights[i], self.biases[i]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x.reshape(len(x), -1)
        if self.mode == "bf16":
            h = h.to(torch.bfloat16)
        saved: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor, torch.Tensor]] = []
        last = len(self.weights) - 1
        for i, path in enumerate(self.paths):
            w, aux = self.rounded[i] if self.rounded is not None else self._round(i)
            if path == "int8":
                hq, hs = quantize_rows(h)
                out = torch._int_mm(hq, w.t()).float().mul_(hs[:, None]).mul_(aux).add_(self.biases[i])
                saved.append((h, (hq, hs), w, aux))
            else:
                out = torch.addmm(aux, h, w.t())
                saved.append((h, None, w, aux))
            h = out.relu_() if i < last else out
        logp = torch.log_softmax(h.float(), 1)
        loss = F.nll_loss(logp, y)
        g = logp.exp_()
        g[torch.arange(len(y)), y] -= 1
        g.div_(len(y))
        grads: list[torch.Tensor] = []
        for i in reversed(range(len(self.paths))):
            h_in, q, w, aux = saved[i]
            grads.append(g.sum(0))
            if q is not None:  # int8: weight gradient in bf16 from the int8 activations, input gradient as int8 GEMM
                hq, hs = q
                grads.append((g * hs[:, None]).t().to(torch.bfloat16).mm(hq.to(torch.bfloat16)).float())
                if i:
                    gq, gs = quantize_rows(g * aux)
                    g = torch._int_mm(gq, w).float().mul_(gs[:, None]).mul_(h_in > 0)
            else:
                gc = g.to(w.dtype)
                grads.append(gc.t().mm(h_in).float())
                if i:
                    g = gc.mm(w).mul_(h_in > 0)
        params = [t for pair in zip(reversed(self.biases), reversed(self.weights), strict=True) for t in pair]
        torch._foreach_add_(params, grads, alpha=-LR)
        return loss


def check_equal(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest difference between the manual int8 step's updated weights and the QAT step's, from the same start
    (raises if the losses differ beyond float rounding)."""
    qat = quantize_model(model)
    set_bitwidth(qat, BITS)
    loss_qat = F.cross_entropy(qat(x), y)
    loss_qat.backward()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        for p in qat.parameters():
            assert p.grad is not None
            p.add_(p.grad, alpha=-LR)
    manual = ManualStep(model, len(x), "int8")
    loss = manual(x, y)
    if not torch.allclose(loss, loss_qat, rtol=1e-5, atol=1e-6):
        raise AssertionError(f"manual int8 loss {float(loss)} != QAT loss {float(loss_qat)}")
    ref = [p.detach() for m in qat.modules() if isinstance(m, nn.Linear) for p in (m.weight, m.bias)]
    mine = [t for pair in zip(manual.weights, manual.biases, strict=True) for t in pair]
    return max(float((a - b).abs().max()) for a, b in zip(ref, mine, strict=True))


def rounding_costs(model: nn.Module, batch: int, rounds: int) -> None:
    """Per layer: rounding its weights to 8 bits as its path does, against the fp32 GEMM of its forward pass."""
    print(f"  per layer at minibatch {batch} (us, min of {rounds}): rounding the weights vs the fp32 forward GEMM")
    for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
        w = layer.weight.detach()
        x = torch.randn(batch, layer.in_features)
        path = choose_path(layer, BITS, batch * layer.in_features * layer.out_features)
        rounding = quant.quantize if path == "int8" else quant.fake_quantize
        fns: dict[str, Callable[[], object]] = {
            "round": functools.partial(rounding, w, BITS, check_finite=False),
            "fp32 GEMM": functools.partial(torch.mm, x, w.t()),
        }
        times = {k: min(v) * 1e6 for k, v in interleaved(fns, rounds, torch.device("cpu")).items()}
        print(
            f"    {layer.in_features:>4} -> {layer.out_features:<4} ({path:<4} path)  rounding {times['round']:7.1f}"
            f"  fp32 GEMM {times['fp32 GEMM']:7.1f}  ratio {times['round'] / times['fp32 GEMM']:5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--model", default="2nn")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} CPU threads")
    model = build_model(args.model, SHAPE, 10, seed=0)
    for batch in args.batches:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *SHAPE, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        diff = check_equal(model, x, y)
        qat = quantize_model(model)
        set_bitwidth(qat, BITS)
        variants: dict[str, Callable[[], object]] = {
            "fp32": make_step(copy.deepcopy(model), x, y, autocast=False),
            "int8 QAT": make_step(qat, x, y, autocast=False),
            "manual fp32": functools.partial(ManualStep(model, batch, "fp32"), x, y),
            "manual int8": functools.partial(ManualStep(model, batch, "int8"), x, y),
            "manual int8, no rounding": functools.partial(ManualStep(model, batch, "int8", round_weights=False), x, y),
            "manual bf16": functools.partial(ManualStep(model, batch, "bf16"), x, y),
        }
        start = time.perf_counter()
        times = interleaved(variants, args.rounds, torch.device("cpu"))
        base, base_med = min(times["fp32"]), statistics.median(times["fp32"])
        print(
            f"\n{args.model}: one SGD step, minibatch {batch}, {args.rounds} interleaved rounds "
            f"({time.perf_counter() - start:.0f} s); manual int8 = QAT step (max weight difference {diff:.1e})"
        )
        print(f"  {'variant':<26} {'min ms':>8} {'median ms':>10} {'vs fp32 (min)':>14} {'(median)':>9}")
        for name, t in times.items():
            lo, med = min(t), statistics.median(t)
            print(f"  {name:<26} {lo * 1e3:8.3f} {med * 1e3:10.3f} {base / lo:13.2f}x {base_med / med:8.2f}x")
        rounding_costs(model, batch, max(20, args.rounds // 2))


if __name__ == "__main__":
    main()
