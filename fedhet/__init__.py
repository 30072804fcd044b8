"""fedhet: federated learning for heterogeneous clients (speed, bitwidth, memory)."""

from fedhet.types import ClientInfo, ClientProfile, Result, Task, Weights

__all__ = ["ClientInfo", "ClientProfile", "Result", "Task", "Weights"]
__version__ = "0.1.0"
