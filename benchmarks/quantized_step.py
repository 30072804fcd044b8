"""Quantized client training: step time, weight memory and upload bytes against fp32, measured in one run.

For the FedAvg CNN and 2NN (Fashion-MNIST shapes, minibatches of 32 and 256) this times one local SGD step
(forward, backward, update) in fp32, under bf16 autocast, and with quantization-aware training at 8 and 4 bits
(:class:`fedhet.clients.quantized.QuantizedTrainer`'s model), interleaving the variants round by round so that
load from other processes hits all alike; it prints the minimum and median step time of each and its ratio to fp32.
It then prints, per quantizable layer, the int8 and fake-quant paths' forward+backward times (the per-layer choice),
the bytes a client stores between tasks, the bytes of one uploaded update, and the peak memory of one training step
(weights, gradients, activations and temporaries, from ``torch.distributed._tools.mem_tracker.MemTracker``) for
fp32, quantization-aware training and low-bit weights (``client.low_bit_weights``), each as a fraction of fp32.

    python benchmarks/quantized_step.py [--rounds 40] [--threads N] [--device cpu|cuda] [--batches 32 256]

On CUDA it also times each step as clients run it there, replayed from a captured CUDA graph
(:class:`fedhet.clients.graphed.GraphedSteps`, the ``graphed`` rows). It ends with issue 17's goals, each marked met
or not against the numbers above.
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedhet import quant
from fedhet.clients.graphed import GraphedSteps
from fedhet.clients.lowbit import LowBitTrainer
from fedhet.clients.quantized import choose_path, int8_gemms_pay, layer_paths, quantize_model, set_bitwidth
from fedhet.clients.trainer import TrainConfig
from fedhet.codec import encoded_size, encoding_for_bitwidth
from fedhet.models import build_model
from fedhet.types import Task

SHAPE = (1, 28, 28)
BATCH = 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        optimizer.step()

    return step


def low_bit_trainer(
    model: nn.Module, bits: int, batch: int, device: torch.device
) -> tuple[LowBitTrainer, torch.optim.Optimizer]:
    """A low-bit trainer with ``model``'s weights loaded at ``bits`` (a task's first step about to run)."""
    trainer = LowBitTrainer(model, TrainConfig(lr=0.05, batch_size=batch, low_bit_weights=True), device)
    task = Task(0, 0, 0, model.state_dict(), local_steps=1)
    return trainer, trainer.begin(task, task.weights, task.optimized, bits, seed=0)


def interleaved(fns: Mapping[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round-robin (``rounds`` calls each after 3 warm-up calls)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


class _Autocast(nn.Module):
    """``model`` under bf16 autocast (fp32 logits), as one module a captured step can hold (no autocast cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False):
            out: torch.Tensor = self.model(x)
        return out.float()


def graphed_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> Callable[[], object]:
    """The step as clients run it on CUDA: :class:`GraphedSteps`, full minibatches replayed from a CUDA graph."""
    steps = GraphedSteps(_Autocast(model) if autocast else model, F.cross_entropy)
    steps.begin(list(model.parameters()), lr=0.05, momentum=0.0, weight_decay=0.0, batch_size=len(x))
    return functools.partial(steps.step, x, y)


def step_times(name: str, batch: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Times every variant's step at minibatch ``batch``; returns each one's speed against fp32 eager (minimum
    times)."""
    model = build_model(name, SHAPE, 10, seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *SHAPE, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    graphs = device.type == "cuda"
    variants: dict[str, Callable[[], object]] = {
        "fp32": make_step(copy.deepcopy(model), x, y, autocast=False),
        "bf16 autocast": make_step(copy.deepcopy(model), x, y, autocast=True),
    }
    if graphs:
        variants["fp32 graphed"] = graphed_step(copy.deepcopy(model), x, y, autocast=False)
        variants["bf16 graphed"] = graphed_step(copy.deepcopy(model), x, y, autocast=True)
    elif name == "cnn":  # the int8 path's im2col yields channels-last activations; this row shows that layout alone
        variants["fp32 channels-last"] = make_step(
            copy.deepcopy(model).to(memory_format=torch.channels_last), x, y, autocast=False
        )
        # bf16 as the vectorized executor trains it (sim.precision=bf16): activations and weights channels-last
        variants["bf16 channels-last"] = make_step(
            copy.deepcopy(model).to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
            y,
            autocast=True,
        )
    paths = {}
    for bits in (8, 4):
        qmodel = quantize_model(model)
        set_bitwidth(qmodel, bits)
        variants[f"int{bits} QAT"] = make_step(qmodel, x, y, autocast=False)
        variants[f"int{bits} QAT"]()
        paths[bits] = layer_paths(qmodel)
        if graphs:
            graphed = quantize_model(model)
            set_bitwidth(graphed, bits)
            variants[f"int{bits} QAT graphed"] = graphed_step(graphed, x, y, autocast=False)
    for bits in (8, 4):
        trainer, optimizer = low_bit_trainer(model, bits, batch, device)
        variants[f"int{bits} low-bit"] = functools.partial(trainer.step, optimizer, x, y)
    times = interleaved(variants, rounds, device)
    base_min, base_med = min(times["fp32"]), statistics.median(times["fp32"])
    print(f"\n{name}: one SGD step, minibatch {batch}, {rounds} interleaved rounds")
    print(f"  {'variant':<20} {'min ms':>8} {'median ms':>10} {'speedup (min)':>14} {'speedup (median)':>17}")
    for variant, t in times.items():
        lo, med = min(t), statistics.median(t)
        print(f"  {variant:<20} {lo * 1e3:8.2f} {med * 1e3:10.2f} {base_min / lo:14.2f}x {base_med / med:16.2f}x")
    print(f"  layer paths: int8 {paths[8]}, int4 {paths[4]}")
    return {variant: base_min / min(t) for variant, t in times.items()}


def layer_choice(name: str, rounds: int, device: torch.device) -> None:
    """Forward+backward time of every quantizable layer on its real input, on the int8 and the fake path."""
    model = build_model(name, SHAPE, 10, seed=0).to(device)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].detach()))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    model(torch.randn(BATCH, *SHAPE, device=device))
    for h in hooks:
        h.remove()
    print(f"\n{name}: per-layer forward+backward at 8 bits (ms, min of {rounds}); chosen = choose_path()")
    for layer_name, x in inputs.items():
        layer = dict(model.named_modules())[layer_name]
        fns = {}
        for path in ("int8", "fake"):
            q = quantize_model(layer)
            set_bitwidth(q, 8, int8_min_macs=0 if path == "int8" else 1 << 62)
            xin = x.clone().requires_grad_(layer_name not in ("0", "1"))  # the first layer needs no input grad

            def run(q: nn.Module = q, xin: torch.Tensor = xin) -> None:
                q(xin).sum().backward()

            fns[path] = run
        if isinstance(layer, nn.Conv2d) and layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] < 64:
            fns.pop("int8")  # below the int8 path's minimum reduction length it is never taken
        times = interleaved(fns, rounds, device)
        macs = _macs(layer, x)
        chosen = choose_path(layer, 8, macs)
        shown = "  ".join(f"{p} {min(t) * 1e3:.3f}" for p, t in times.items())
        print(f"  layer {layer_name} {type(layer).__name__:<7} {macs / 1e6:7.1f} M MACs: {shown}  -> chosen {chosen}")


def _macs(layer: nn.Module, x: torch.Tensor) -> int:
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return x.shape[0] * x.shape[2] * x.shape[3] * kh * kw * layer.in_channels * layer.out_channels
    assert isinstance(layer, nn.Linear)
    return x.numel() // layer.in_features * layer.in_features * layer.out_features


def memory_and_upload(name: str) -> None:
    weights = build_model(name, SHAPE, 10, seed=0).state_dict()
    fp32 = sum(v.numel() * 4 for v in weights.values())
    params = sum(v.numel() for v in weights.values())
    print(f"\n{name}: {params} parameters; weights stored between tasks, and one uploaded update")
    print(f"  {'format':<8} {'stored bytes':>13} {'of fp32':>8} {'upload bytes':>13} {'of fp32':>8}")
    up32 = encoded_size(weights, "fp32")
    for fmt, stored in (
        ("fp32", fp32),
        ("bf16", params * 2),
        ("int8", _packed_bytes(weights, 8)),
        ("int4", _packed_bytes(weights, 4)),
    ):
        upload = encoded_size(weights, fmt if fmt in ("fp32", "bf16") else encoding_for_bitwidth(int(fmt[3:])))
        print(f"  {fmt:<8} {stored:13d} {stored / fp32:8.2%} {upload:13d} {upload / up32:8.2%}")
    print(
        f"  during a task (any bitwidth <= 8): fp32 master {fp32} B + fp32 grads {fp32} B + transient int8 weights "
        f"{params} B = {(2 * fp32 + params) / fp32:.2f}x fp32 weights (fp32 training: 2.00x); low-bit weights: "
        f"{params} B of integers, no gradient (peak step memory below)"
    )


def peak_memory(name: str, device: torch.device) -> dict[str, float]:
    """Peak tensor memory of one training step (minibatch 32), after the task's weights are loaded."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = build_model(name, SHAPE, 10, seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *SHAPE, generator=g).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=g).to(device)

    def measure(module: nn.Module, step: Callable[[], object]) -> dict[str, float]:
        """(Plain SGD keeps no optimiser state: the module's tensors and the step's are all there is.)"""
        tracker = MemTracker()
        tracker.track_external(module)
        with tracker:
            step()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
        return {str(kind).rsplit(".", 1)[-1]: value for kind, value in peak.items()}

    rows: dict[str, dict[str, float]] = {}
    for label, bits in (("fp32", 32), ("int8 QAT", 8), ("int4 QAT", 4)):
        qmodel = quantize_model(model)
        set_bitwidth(qmodel, bits)
        step = make_step(qmodel, x, y, autocast=False)
        rows[label] = measure(qmodel, step)
    for bits in (8, 4):
        trainer, optimizer = low_bit_trainer(model, bits, BATCH, device)
        rows[f"int{bits} low-bit"] = measure(trainer.model, functools.partial(trainer.step, optimizer, x, y))
    base = rows["fp32"]["Total"]
    print(f"\n{name}: peak memory of one training step, minibatch {BATCH} (MiB)")
    kinds = ("PARAM", "BUFFER", "GRAD", "ACT", "TEMP")
    print(f"  {'variant':<15} " + " ".join(f"{k.lower():>7}" for k in kinds) + f" {'total':>7} {'of fp32':>8}")
    for label, row in rows.items():
        cells = " ".join(f"{row.get(k, 0.0) / 2**20:7.2f}" for k in kinds)
        print(f"  {label:<15} {cells} {row['Total'] / 2**20:7.2f} {row['Total'] / base:8.2f}x")
    return {label: row["Total"] / base for label, row in rows.items()}


def _packed_bytes(weights: dict[str, torch.Tensor], bits: int) -> int:
    return sum(v.nbytes for v in quant.pack_weights(weights, bits).values())


def goals(
    speed: dict[tuple[str, int], dict[str, float]], memory: dict[str, dict[str, float]], device: torch.device
) -> None:
    """Issue 17's goals, each against its measurement above. A client's step is the graphed one on CUDA (what
    ``cuda_graphs`` runs there) and the eager one elsewhere; bf16 on a CPU is the CNN channels-last, the layout the
    vectorized executor's bf16 trains in."""
    cuda = device.type == "cuda"
    rows: list[tuple[str, float, str, bool]] = []
    for (name, batch), ratios in speed.items():
        client = {b: ratios[f"{b} graphed" if cuda else b] for b in ("int8 QAT", "int4 QAT")}
        client["bf16"] = ratios["bf16 graphed" if cuda else "bf16 channels-last" if name == "cnn" else "bf16 autocast"]
        at = f"{name}, minibatch {batch}"
        if cuda:
            for variant in ("int8 QAT", "int4 QAT", "bf16"):
                rows.append(
                    (f"{variant} step >= 1.0x fp32 eager ({at})", client[variant], ">= 1.00x", client[variant] >= 1.0)
                )
            best = max(v for k, v in ratios.items() if k.endswith("graphed"))
            rows.append((f"a captured step >= 3x fp32 eager ({at})", best, ">= 3.00x", best >= 3.0))
        else:
            need = 1.5 if batch <= 32 else 2.5
            rows.append(
                (f"int8 >= {need}x fp32 ({at})", client["int8 QAT"], f">= {need:.2f}x", client["int8 QAT"] >= need)
            )
            rows.append((f"bf16 >= 1.5x fp32 ({at})", client["bf16"], ">= 1.50x", client["bf16"] >= 1.5))
            rows.append(
                (
                    f"int4 >= int8 ({at})",
                    client["int4 QAT"],
                    f">= {client['int8 QAT']:.2f}x",
                    client["int4 QAT"] >= client["int8 QAT"],
                )
            )
    for name, ratios in memory.items():
        for bits, limit in ((8, 0.6), (4, 0.4)):
            value = min(ratios[f"int{bits} low-bit"], ratios[f"int{bits} QAT"])
            rows.append(
                (f"int{bits} peak step memory <= {limit}x fp32 ({name})", value, f"<= {limit:.2f}x", value <= limit)
            )
    print(f"\nissue 17's goals on {device.type} (speed: minimum step time against fp32 eager, same run)")
    for goal, value, target, met in rows:
        print(f"  {'met    ' if met else 'NOT met'}  {goal:<55} {value:6.2f}x  (goal {target})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256], help="minibatch sizes timed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__}, device {device} ({where}), {torch.get_num_threads()} CPU threads")
    print(f"integer GEMMs pay here (the int8 path is the default): {int8_gemms_pay(device)}")
    speed = {
        (name, batch): step_times(name, batch, args.rounds, device) for name in ("cnn", "2nn") for batch in args.batches
    }
    for name in ("cnn", "2nn"):
        layer_choice(name, max(10, args.rounds // 2), device)
    for name in ("cnn", "2nn"):
        memory_and_upload(name)
    memory = {name: peak_memory(name, device) for name in ("cnn", "2nn")}
    goals(speed, memory, device)


if __name__ == "__main__":
    main()
