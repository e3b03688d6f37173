"""Federated training of the vessel network with Flower (FedAvg, five folds).

``python -m train`` simulates a federation on this machine; ``train/deploy/`` runs it across
hospitals. The Flower app is ``train.server_app:app`` and ``train.client_app:app``.
"""

from train.config import TrainConfig
from train.folds import split_cases
from train.loss import positive_weight, vessel_loss

__all__ = ["TrainConfig", "positive_weight", "split_cases", "vessel_loss"]
