"""Bytes one round of FedP3 moves against FedAvg's, exactly, for the variants of ``configs/variant/fedp3/``: the
codec's encoded payloads of every client's plan (down) and of the layers it sends back (up), with 100 clients and
the released code's CNN. Payload sizes do not depend on the trained values (a pruned tensor keeps
``ceil(keep * numel)`` values), so the initial model stands for every round.

    python simulations/fedp3/bytes_per_round.py
"""

from __future__ import annotations

from fedhet.codec import encoded_size
from fedhet.models import build_model
from fedhet.strategies.fedp3 import FedP3Planner
from fedhet.types import ClientInfo, ClientProfile

CLIENTS = 100
VARIANTS: dict[str, FedP3Planner] = {
    "fedp3_lowerb": FedP3Planner("lowerb"),
    "fedp3_opu2": FedP3Planner("opu2"),
    "fedp3_opu3": FedP3Planner("opu3"),
    "fedp3_opu2_k50": FedP3Planner("opu2", keep_ratio=0.5),
    "fedp3_opu2_int8": FedP3Planner("opu2", frozen_bits=8),
    "fedp3_opu2_od50_int8": FedP3Planner("opu2", keep_ratio=0.5, pruning="ordered_dropout", frozen_bits=8),
    "fedp3_lowerb_int8": FedP3Planner("lowerb", frozen_bits=8),
}


def main() -> None:
    weights = {k: v.detach() for k, v in build_model("fedp3_cnn", (1, 28, 28), 10, seed=0).state_dict().items()}
    full = encoded_size(weights, "fp32")
    baseline = 2 * CLIENTS * full
    print("| variant | MB down / round | MB up / round | bytes / FedAvg | fewer than FedAvg |\n|---|---|---|---|---|")
    print(f"| fedavg | {CLIENTS * full / 1e6:.2f} | {CLIENTS * full / 1e6:.2f} | 1.000 | 0.0% |")
    for name, planner in VARIANTS.items():
        down = up = 0
        for client in range(CLIENTS):
            plan = planner.plan(ClientInfo(client, ClientProfile(1.0, 1e6), 100), weights, 0)
            down += encoded_size(plan.weights, "fp32", plan.sparse, plan.sparse_bits)
            up += encoded_size({k: v for k, v in plan.weights.items() if k in plan.train}, "fp32")
        ratio = (down + up) / baseline
        print(f"| {name} | {down / 1e6:.2f} | {up / 1e6:.2f} | {ratio:.3f} | {1 - ratio:.1%} |")


if __name__ == "__main__":
    main()
