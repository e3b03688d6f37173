"""The run configuration of a federated training: one dataclass, spoken as Flower run config.

Flower passes configuration as flat ``key = value`` pairs with kebab-case keys (the
``[tool.flwr.app.config]`` section of ``pyproject.toml``, overridable with ``flwr run
--run-config``). :class:`TrainConfig` holds the same keys with Python names and checks them
once, so that the server, the sites and the exported manifest read one validated object.
Its defaults are the paper's training (Mazher et al.: Adam, lr 1e-4, batch 2, 10 random
patches per case per epoch, ``BCE + 0.6 WBCE + 0.4 Dice``, early stopping after 20 epochs
without improvement) with 96^3 patches; ``pyproject.toml`` repeats them (a test keeps the two
equal).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any

from inference.preprocessing import DEFAULT_NORMALIZATION
from model.network import DOWNSAMPLING, UPSAMPLINGS, Architecture

PRECISIONS = ("auto", "fp32", "bf16")
LR_DROP = 0.1
AGGREGATIONS = ("fedavg", "trimmed-mean", "median")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one fold's federated training (run config keys in kebab-case)."""

    fold: int = 0
    num_folds: int = 5
    num_rounds: int = 1000
    local_epochs: int = 1
    patience: int = 20  # rounds without a better validation Dice before stopping
    # Plateaus survived: each restarts from the best model at LR_DROP times the learning rate
    # (0: stop at the first, as the paper)
    lr_drops: int = 0
    patches_per_case: int = 10
    batch_size: int = 2
    learning_rate: float = 1e-4
    foreground_fraction: float = 0.33  # patches centred on a vessel voxel (nnU-Net: 0.33)
    loss_alpha: float = 0.6  # L = BCE + alpha WBCE + (1 - alpha) Dice, paper's equation (2)
    pos_weight: float = 0.0  # WBCE vessel weight; 0: sqrt((1 - f) / f), f the site's vessels
    augment: bool = True  # flips, right-angle rotations, zoom (train.sampling)
    augment_intensity: bool = True  # noise, blur, brightness, contrast, gamma
    augment_levels: bool = False  # tissue and vessel levels as other volumes' normalisation sets
    patch_size: int = 96  # cubic patches, a multiple of 16
    base_channels: int = 16
    hsca: bool = True
    msfe: bool = True
    upsampling: str = "trilinear"  # decoder: the paper's trilinear, or "transposed" convs
    target_spacing: float = 0.227  # mm, isotropic (SHINY-ICARUS' 3DRA spacing)
    precision: str = "auto"  # bf16 where native; fp16 (loss-scaled) on older GPUs; else fp32
    val_overlap: float = 0.25  # sliding-window overlap of the validation forward
    seed: int = 0
    init_weights: str = ""  # start from this model (.safetensors) instead of a seeded one
    wait_for_sites: int = 1  # sites that must be connected before the first round
    min_sites: int = 1  # a round goes ahead with at least this many connected sites
    round_timeout: float = 3600.0  # seconds to wait for the sites' replies in one phase
    run_dir: str = "work/train"  # checkpoints: RUN_DIR/fold<f>/
    out_dir: str = "weights"  # exported fold weights and manifest.json
    sim_data_root: str = ""  # simulation only: site folders, one per simulated SuperNode
    # Aggregation: the paper's FedAvg, or Flower's FedTrimmedAvg / FedMedian against a faulty site
    aggregation: str = "fedavg"
    trim_beta: float = 0.2  # trimmed-mean: fraction of sites cut at each end, per coordinate
    # Central DP, Flower's client-side fixed clipping: each site clips its update to this L2 norm,
    # the server adds Gaussian noise of std noise * norm / sites to the average (0 norm: off)
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 0.0
    # Flower's SecAgg+: the server only learns the weighted sum of the sites' models
    secagg: bool = False
    secagg_num_shares: int = 3  # key shares per site (its neighbours in the protocol)
    secagg_reconstruction_threshold: int = 2  # shares that rebuild a dropped site's mask
    secagg_max_weight: float = 100.0  # at least the largest site's training cases

    @property
    def differential_privacy(self) -> bool:
        return self.dp_clipping_norm > 0

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.fold < self.num_folds:
            problems.append(f"fold {self.fold} is not in 0..{self.num_folds - 1}")
        for name in (
            "num_rounds",
            "local_epochs",
            "patches_per_case",
            "batch_size",
            "base_channels",
            "min_sites",
            "wait_for_sites",
            "num_folds",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1")
        if self.patience < 1:
            problems.append("patience must be at least 1 round")
        if self.lr_drops < 0:
            problems.append("lr-drops must be 0 or more")
        if self.patch_size < DOWNSAMPLING or self.patch_size % DOWNSAMPLING:
            problems.append(f"patch-size {self.patch_size} is not a multiple of {DOWNSAMPLING}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            problems.append("foreground-fraction must lie in [0, 1]")
        if not 0.0 <= self.loss_alpha <= 1.0:
            problems.append("loss-alpha must lie in [0, 1]")
        if not 0.0 <= self.val_overlap < 1.0:
            problems.append("val-overlap must lie in [0, 1)")
        if self.pos_weight < 0:
            problems.append("pos-weight must be positive (or 0 for the site's class balance)")
        if self.learning_rate <= 0 or self.target_spacing <= 0 or self.round_timeout <= 0:
            problems.append("learning-rate, target-spacing and round-timeout must be positive")
        if self.upsampling not in UPSAMPLINGS:
            problems.append(f"upsampling {self.upsampling!r} is not one of {UPSAMPLINGS}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {PRECISIONS}")
        problems += self._aggregation_problems()
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    def _aggregation_problems(self) -> list[str]:
        problems = []
        if self.aggregation not in AGGREGATIONS:
            problems.append(f"aggregation {self.aggregation!r} is not one of {AGGREGATIONS}")
        if not 0.0 <= self.trim_beta < 0.5:
            problems.append("trim-beta must lie in [0, 0.5)")
        if self.dp_noise_multiplier < 0 or self.dp_clipping_norm < 0:
            problems.append("dp-noise-multiplier and dp-clipping-norm must not be negative")
        if self.dp_noise_multiplier > 0 and self.dp_clipping_norm == 0:
            problems.append("dp-noise-multiplier needs a dp-clipping-norm")
        # DP noise is calibrated to a mean of clipped updates; SecAgg+ reveals only the sum
        if (self.differential_privacy or self.secagg) and self.aggregation != "fedavg":
            problems.append("dp-clipping-norm and secagg need aggregation = 'fedavg'")
        if self.secagg_num_shares < 3:
            problems.append("secagg-num-shares must be at least 3")
        if not 2 <= self.secagg_reconstruction_threshold < self.secagg_num_shares:
            problems.append("secagg-reconstruction-threshold must lie in [2, secagg-num-shares)")
        if self.secagg_max_weight <= 0:
            problems.append("secagg-max-weight must be positive")
        return problems

    @property
    def architecture(self) -> Architecture:
        return Architecture(
            base_channels=self.base_channels,
            hsca=self.hsca,
            msfe=self.msfe,
            upsampling=self.upsampling,
        )

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        return (self.patch_size,) * 3

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (self.target_spacing,) * 3

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case keys and values, as Flower's run config and ConfigRecord carry them."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> TrainConfig:
        """Read Flower's run config (unknown keys are an error, missing keys take defaults)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown training setting {key!r}")
            values[name] = _coerce(key, value, known[name].type)
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Settings a site needs to train and validate; paths of the server stay on the server.
SITE_KEYS = (
    "fold",
    "num-folds",
    "local-epochs",
    "patches-per-case",
    "batch-size",
    "learning-rate",
    "foreground-fraction",
    "loss-alpha",
    "pos-weight",
    "augment",
    "augment-intensity",
    "augment-levels",
    "patch-size",
    "base-channels",
    "hsca",
    "msfe",
    "upsampling",
    "target-spacing",
    "precision",
    "val-overlap",
    "seed",
)


# Sent beside the settings: the server's intensity normalisation, which every site must share
NORMALIZATION_KEY = "normalization"


def site_config(config: TrainConfig, lr_drops_done: int = 0) -> dict[str, Any]:
    """The part of the configuration sent to the sites each round, at the learning rate of
    the plateaus passed so far, with the normalisation the run records (JSON)."""
    every = config.to_run_config()
    return {
        **{key: every[key] for key in SITE_KEYS},
        "learning-rate": learning_rate(config, lr_drops_done),
        NORMALIZATION_KEY: json.dumps(DEFAULT_NORMALIZATION, sort_keys=True),
    }


def learning_rate(config: TrainConfig, lr_drops_done: int) -> float:
    """The rate after ``lr_drops_done`` plateaus: ``learning-rate`` x LR_DROP per plateau."""
    return config.learning_rate * LR_DROP**lr_drops_done


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Flower may deliver ``1`` for a float setting or ``"true"`` from a CLI string."""
    try:
        if annotation == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if annotation == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"training setting {key!r}: {value!r} is not a {annotation}") from None
