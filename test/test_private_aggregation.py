"""Differential privacy and SecAgg+ from Flower take effect on real (simulated) federations.

Each test runs the project's ServerApp and ClientApp on Flower's simulation engine (three
phantom sites, 32^3 cases, a narrow network, three rounds) and watches, in-process, what the
guarded strategy under Flower's wrappers receives.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.simulation import run_simulation

from train.client_app import build_client_app
from train.server_app import build_server_app
from train.strategy import GuardedAggregation

TINY = {
    "patch-size": 32,
    "base-channels": 4,
    "patches-per-case": 2,
    "val-overlap": 0.0,
    "precision": "fp32",
    "num-rounds": 3,
    "wait-for-sites": 3,
    "min-sites": 3,
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> list[Path]:
    """Three phantom sites, three 32^3 cases each, in the nnU-Net raw layout."""
    from phantoms import write_dataset

    return write_dataset(tmp_path_factory.mktemp("federation"), 3, (32, 32, 32), 5, sites=3)


@pytest.fixture
def seen(monkeypatch) -> list[dict]:
    """Per training round: the global model sent and the replies' models the strategy sees."""
    rounds: list[dict] = []
    configure, aggregate = GuardedAggregation.configure_train, GuardedAggregation.aggregate_train

    def configure_train(self, server_round, arrays, config, grid):
        rounds.append({"sent": {k: v.numpy().copy() for k, v in arrays.items()}, "replies": []})
        return configure(self, server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for reply in replies:
            record = next(iter(reply.content.array_records.values()))
            rounds[-1]["replies"].append({k: v.numpy().copy() for k, v in record.items()})
        return aggregate(self, server_round, replies)

    monkeypatch.setattr(GuardedAggregation, "configure_train", configure_train)
    monkeypatch.setattr(GuardedAggregation, "aggregate_train", aggregate_train)
    return rounds


def simulate(federation: list[Path], tmp_path: Path, **changes) -> dict:
    """Train on the simulation engine in this process; the run's state.json."""
    overrides = {
        **TINY,
        "run-dir": str(tmp_path / "runs"),
        "out-dir": str(tmp_path / "weights"),
        **changes,
    }
    run_simulation(
        build_server_app(overrides),
        build_client_app(str(federation[0].parent)),
        len(federation),
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )
    return json.loads((tmp_path / "runs" / "fold0" / "state.json").read_text())


def update_norm(model: dict, sent: dict) -> float:
    return math.sqrt(sum(float(np.sum((model[k] - sent[k]) ** 2)) for k in sent))


def assert_trained_and_improved(state: dict) -> None:
    history = state["history"]
    print("train loss per round:", [round(r["train"]["loss"], 4) for r in history])  # README
    assert len(history) == TINY["num-rounds"]
    for record in history:
        assert sorted(record["train"]["sites"]) == ["site1", "site2", "site3"], record["train"]
        assert not record["train"]["left_out"] and not record["train"]["failures"]
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]


CLIPPING_NORM = 0.5  # below what one round moves these tiny networks at this learning rate


def test_differential_privacy_clips_every_update_and_still_learns(federation, tmp_path, seen):
    state = simulate(
        federation,
        tmp_path,
        **{"dp-clipping-norm": CLIPPING_NORM, "dp-noise-multiplier": 0.01, "learning-rate": 1e-3},
    )
    assert_trained_and_improved(state)
    norms = [update_norm(r, rnd["sent"]) for rnd in seen for r in rnd["replies"]]
    assert len(norms) == 3 * TINY["num-rounds"]
    assert max(norms) <= CLIPPING_NORM * (1 + 1e-4), norms
    assert min(norms) >= 0.99 * CLIPPING_NORM, "updates smaller than the norm: clipping untested"
    provenance = json.loads((tmp_path / "weights" / "manifest.json").read_text())["provenance"]
    privacy = provenance["folds"]["0"]["differential_privacy"]
    assert privacy["clipping_norm"] == CLIPPING_NORM and privacy["noise_multiplier"] == 0.01


def test_secure_aggregation_hides_each_sites_model_and_still_learns(federation, tmp_path, seen):
    state = simulate(federation, tmp_path, secagg=True, **{"learning-rate": 1e-3})
    assert_trained_and_improved(state)
    for rnd in seen:
        first, *others = rnd["replies"]
        assert len(others) == 2
        # every reply the strategy holds carries the same model: the sites' weighted average
        assert all(np.array_equal(first[k], other[k]) for other in others for k in first)
        assert update_norm(first, rnd["sent"]) > 0
    # each site's own metrics still arrive
    assert {s["cases"] for s in state["history"][0]["train"]["sites"].values()} == {2}


def test_secure_aggregation_goes_on_without_a_refusing_site_and_says_why(
    federation, tmp_path, seen
):
    """A site that refuses to train (here an unreadable label) drops out of SecAgg+: the two
    others still reach the threshold, their masks are removed and the round aggregates them;
    the run records the site's own error, not silence."""
    hospitals = tmp_path / "hospitals"
    shutil.copytree(federation[0].parent, hospitals)
    broken = sorted((hospitals / federation[2].name / "labelsTr").glob("*.nii.gz"))[0]
    broken.write_bytes(b"not an image")
    sites = [hospitals / site.name for site in federation]
    state = simulate(sites, tmp_path, secagg=True, **{"learning-rate": 1e-3})
    history = state["history"]
    assert len(history) == TINY["num-rounds"]
    for record, rnd in zip(history, seen, strict=True):
        assert sorted(record["train"]["sites"]) == ["site1", "site2"], record["train"]
        (problem,) = record["train"]["failures"]
        assert problem.endswith(f"{broken}: not a readable image"), problem  # one line
        first, other = rnd["replies"]  # the two sites' aggregate, never one site's model
        assert all(np.array_equal(first[k], other[k]) for k in first)
        assert update_norm(first, rnd["sent"]) > 0
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
