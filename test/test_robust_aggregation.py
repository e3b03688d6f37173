"""Robust aggregation (Flower's FedTrimmedAvg, FedMedian) against one faulty or hostile site.

Three honest sites take real Adam steps from the same global network; a fourth sends the first
one's update scaled by -10 (sign-flipped and amplified). The guarded strategies aggregate real
messages; the distance to the clean aggregate (the three honest sites under FedAvg) says who
kept the model. Margin: the robust aggregate stays within the honest sites' own spread (the
largest distance of an honest model from the clean aggregate), while FedAvg lands more than
twice as far from it as the clean round moved the model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from test_private_aggregation import federation, simulate  # noqa: F401 (a fixture)

from model.network import Architecture, VesselUNet
from train.strategy import RobustFedAvg, RobustFedMedian, RobustFedTrimmedAvg

ADVERSARY_SCALE = -10.0


def honest_model(start: VesselUNet, seed: int) -> dict[str, np.ndarray]:
    """Two Adam steps of a site from the global model, on its own (random) patches."""
    torch.manual_seed(seed)
    net = VesselUNet(start.architecture)
    net.load_state_dict(start.state_dict())
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(2):
        image = torch.randn(2, 1, 16, 16, 16)
        logits = net(image)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, 1:2] - logits[:, 0:1], (image > 1.0).float()
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


@pytest.fixture
def serverapp_identity():
    """The identity Flower's runtime gives a ServerApp process (its messages carry it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def site_reply(arrays: dict[str, np.ndarray], site: str) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 2, "train-loss": 0.5}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content, dst_node_id=0, message_type="train")


def aggregate(strategy, models: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    replies = [site_reply(m, f"site{i}") for i, m in enumerate(models)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}


def distance(a: dict, b: dict) -> float:
    keys = [k for k in a if "num_batches" not in k]
    return math.sqrt(sum(float(np.sum((a[k].astype(float) - b[k]) ** 2)) for k in keys))


def test_one_hostile_site_wrecks_fedavg_but_not_the_robust_strategies(serverapp_identity):
    torch.manual_seed(0)
    start = VesselUNet(Architecture(base_channels=4))
    initial = {k: v.numpy().copy() for k, v in start.state_dict().items()}
    honest = [honest_model(start, seed) for seed in (1, 2, 3)]
    hostile = {
        k: np.asarray(initial[k] + ADVERSARY_SCALE * (honest[0][k] - initial[k])) for k in initial
    }
    clean = aggregate(RobustFedAvg(), honest)
    spread = max(distance(model, clean) for model in honest)
    moved = distance(clean, initial)

    attacked = {
        "fedavg": distance(aggregate(RobustFedAvg(), [*honest, hostile]), clean),
        "median": distance(aggregate(RobustFedMedian(), [*honest, hostile]), clean),
        "trimmed-mean": distance(
            aggregate(RobustFedTrimmedAvg(beta=0.25), [*honest, hostile]), clean
        ),
    }
    print(json.dumps({"moved": moved, "spread": spread, **attacked}))
    assert attacked["fedavg"] > 2 * moved, attacked
    assert attacked["median"] <= spread, attacked
    assert attacked["trimmed-mean"] <= spread, attacked


def test_the_median_switch_runs_a_federation(federation, tmp_path):  # noqa: F811
    state = simulate(federation, tmp_path, aggregation="median", **{"num-rounds": 2})
    for record in state["history"]:
        assert sorted(record["train"]["sites"]) == ["site1", "site2", "site3"], record["train"]
        assert not record["train"]["left_out"] and not record["train"]["failures"]
    manifest = json.loads((tmp_path / "weights" / "manifest.json").read_text())
    assert manifest["provenance"]["folds"]["0"]["aggregation"] == "median"
