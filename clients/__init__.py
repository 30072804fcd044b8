"""What one device does: local trainers and (in deployment) the network loop."""

from fedhet.clients.trainer import LocalTrainer, TrainConfig

__all__ = ["LocalTrainer", "TrainConfig"]
