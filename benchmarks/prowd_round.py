"""ProWD's server-side cost per round against the naive weighted mean, measured in one run.

One synchronous round of the bitwidth experiment (``configs/experiment/bitwidth.yaml``): the FedAvg CNN, a tenth of
100 clients, half of them at ``--low`` bits and half at fp32, each upload a small random step from the global
model. It times the aggregation of that round by the naive weighted mean (the baseline), ProWD and its two
ablations (dequantizer only, selective aggregation only), with the configs' parameters, and prints each one's
seconds (minimum and median over ``--rounds``) and its ratio to the naive mean.

    python benchmarks/prowd_round.py [--device cpu|cuda] [--rounds 3] [--threads 1] [--low 2] [--profile]

``--profile`` then profiles one more ProWD aggregation (torch.profiler) and prints its 25 costliest operations.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fedhet import quant
from fedhet.models import build_model
from fedhet.strategies import UpdateBuffer
from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.prowd import SERVER_BUFFER, ProWD
from fedhet.types import Result, Weights

UPLOADS = 10  # a tenth of 100 clients
SAMPLES = 600  # each client's share of Fashion-MNIST's 60,000


def round_buffer(start: Weights, low: int, device: torch.device) -> UpdateBuffer:
    buf = UpdateBuffer(keep_updates=True)
    for task in range(UPLOADS):
        bits = low if task < UPLOADS // 2 else quant.FULL_PRECISION
        g = torch.Generator(device=device).manual_seed(task)
        trained = {k: v + 0.01 * torch.randn(v.shape, generator=g, device=device) for k, v in start.items()}
        upload = quant.quantize_weights(trained, bits) if bits < quant.FULL_PRECISION else trained
        result = Result(task, task, 0, upload, SAMPLES, local_steps=19, train_seconds=1, loss=0, bitwidth=bits)
        buf.add(result, float(SAMPLES))
    return buf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--low", type=int, default=2, help="the low clients' bitwidth")
    parser.add_argument("--profile", action="store_true", help="profile one more ProWD aggregation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model("cnn", (1, 28, 28), 10, seed=0).to(device)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server_inputs = torch.randn(SERVER_BUFFER, 1, 28, 28, device=device)
    methods: dict[str, Callable[[], WeightedMean | ProWD]] = {
        "naive mean": lambda: WeightedMean(),
        "ProWD": lambda: ProWD(seed=0),
        "dequantizer only": lambda: ProWD(selective=False, seed=0),
        "selective only": lambda: ProWD(dequantizer=False, seed=0),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    print(f"device {device}, {torch.get_num_threads()} threads, CNN, {UPLOADS} uploads: half {args.low}-bit, half fp32")
    for version in range(args.rounds):  # interleaved, so that load from other processes hits all alike
        for name, make in methods.items():
            aggregator = make()
            if isinstance(aggregator, ProWD):
                aggregator.attach(model, server_inputs)
                aggregator.lowest_seen = args.low
            buf = round_buffer(start, args.low, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = aggregator.aggregate(start, buf, version)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
            assert all(bool(torch.isfinite(v.double()).all()) for v in out.values())
    base = min(times["naive mean"])
    print(f"{'aggregation':<18} {'min s':>8} {'median s':>9} {'vs naive':>9}")
    for name, ts in times.items():
        print(f"{name:<18} {min(ts):>8.3f} {statistics.median(ts):>9.3f} {min(ts) / base:>8.0f}x")
    if args.profile:
        profile(model, start, server_inputs, args.low, device)


def profile(model: torch.nn.Module, start: Weights, inputs: torch.Tensor, low: int, device: torch.device) -> None:
    """One ProWD aggregation under torch.profiler: its costliest operations, by self time on the device (CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    aggregator = ProWD(seed=0)
    aggregator.attach(model, inputs)
    aggregator.lowest_seen = low
    buf = round_buffer(start, low, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        aggregator.aggregate(start, buf, 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
