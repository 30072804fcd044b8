"""Flower interoperability (``pip install fedhet[flower]``, flwr >= 1.42).

- :mod:`~fedhet.flower.serverapp`: a Flower ServerApp that drives any fedhet strategy (FedCompass, FedAsync,
  FedBuff, FedAvg, with any planner and aggregator) through Flower's Grid, on the real clock, writing the same
  ``metrics.jsonl`` as ``fedhet server``;
- :mod:`~fedhet.flower.clientapp`: a Flower ClientApp that runs fedhet's trainers (plain, quantized at the
  client's bitwidth, FedP3's pruned sub-models with a personal head, DP-SGD) on the task a message carries;
- :mod:`~fedhet.flower.records`: fedhet's tensor encodings (fp32/fp16/bf16, packed int-b, sparse) as Flower
  records, without loss;
- :mod:`~fedhet.flower.numpy_client`: a classic Flower ``NumPyClient`` joins a fedhet server as ``fedhet client``
  does (a client over fedhet's gRPC wire: imported on its own, so the rest of this package loads no wire code);
- :mod:`~fedhet.flower.local`: an in-process Grid for tests.

See ``docs/coming_from_flower.md``.
"""

from fedhet.flower.clientapp import ClientAppSettings, FedhetClient, make_client_app
from fedhet.flower.local import LocalGrid
from fedhet.flower.records import RecordError, from_array_record, to_array_record
from fedhet.flower.serverapp import GridDriver, ServerAppSettings, make_server_app, run_on_grid
from fedhet.flower.settings import DriverSettings, RunSummary

__all__ = [
    "ClientAppSettings",
    "DriverSettings",
    "FedhetClient",
    "GridDriver",
    "LocalGrid",
    "RecordError",
    "RunSummary",
    "ServerAppSettings",
    "from_array_record",
    "make_client_app",
    "make_server_app",
    "run_on_grid",
    "to_array_record",
]
