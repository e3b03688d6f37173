"""The network and its fold weights."""

from model.network import Architecture, VesselUNet, check_input_size, parameter_count, probabilities
from model.weights import (
    Manifest,
    WeightError,
    load_ensemble,
    load_fold,
    load_manifest,
    save_fold,
    write_manifest,
)

__all__ = [
    "Architecture",
    "Manifest",
    "VesselUNet",
    "WeightError",
    "check_input_size",
    "load_ensemble",
    "load_fold",
    "load_manifest",
    "parameter_count",
    "probabilities",
    "save_fold",
    "write_manifest",
]
