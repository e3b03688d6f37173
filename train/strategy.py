"""FedAvg that a broken site cannot poison, and whose average does not depend on reply order.

Flower's :class:`~flwr.serverapp.strategy.FedAvg` computes the paper's equation (1),
``theta <- sum_k |D_k| / sum_j |D_j| theta_k``, weighting each reply by its ``num-examples``
(the site's number of training cases). :class:`RobustFedAvg` adds two things in front of it:

- replies whose parameters are not the global model's arrays (names, shapes) or are not
  finite, or whose weight or loss is not finite, are left out of the average and logged,
  instead of turning the global model into NaN (or crashing the server);
- the remaining replies are averaged in the order of their site names, so that the float
  sums, hence the global model, are the same whichever site answered first;
- a site that did not answer the round's training at all (crashed, disconnected: Flower
  only notices after two missed heartbeats, about a minute) is not asked to validate in the
  same round, so that a dead site costs one ``round-timeout``, not two.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

log = logging.getLogger("flwr").getChild("train")

WEIGHT_KEY = "num-examples"
SITE_KEY = "site"  # ConfigRecord of a reply: the site's name and dataset fingerprint


def site_name(message: Message) -> str:
    """The site name a reply reports, else its node id."""
    if not message.has_error() and SITE_KEY in message.content.config_records:
        return str(message.content.config_records[SITE_KEY].get("name", ""))
    return f"node {message.metadata.src_node_id}"


def update_problem(content: RecordDict, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a training reply must not enter the average, or None when it may."""
    arrays = list(content.array_records.values())
    metrics = list(content.metric_records.values())
    if len(arrays) != 1 or len(metrics) != 1:
        return f"{len(arrays)} parameter and {len(metrics)} metric records, expected one each"
    weight = metrics[0].get(WEIGHT_KEY)
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        return f"invalid {WEIGHT_KEY} {weight!r}"
    loss = metrics[0].get("train-loss", 0.0)
    if isinstance(loss, float) and not math.isfinite(loss):
        return f"non-finite training loss {loss}"
    record = arrays[0]
    if shapes and set(record) != set(shapes):
        return f"parameter names differ from the global model's ({len(record)} arrays)"
    for name, array in record.items():
        values = array.numpy()
        if shapes and tuple(values.shape) != shapes[name]:
            return f"{name} has shape {tuple(values.shape)}, the model's is {shapes[name]}"
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"non-finite values in {name}"
    return None


class RobustFedAvg(FedAvg):
    """FedAvg weighted by training cases, without non-finite or malformed updates.

    ``wait_for_nodes`` nodes must be connected before the first training round (all the
    expected sites); later rounds go ahead with ``min_available_nodes``, so that a site that
    drops out does not stall the federation.
    """

    def __init__(self, wait_for_nodes: int = 1, **kwargs) -> None:
        kwargs.setdefault("weighted_by_key", WEIGHT_KEY)
        super().__init__(**kwargs)
        self.wait_for_nodes = wait_for_nodes
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.left_out: dict[str, str] = {}  # site -> reason, for the last training round
        self.sampled: set[int] = set()  # nodes asked to train in the last round
        self.silent: set[int] = set()  # of those, the nodes that did not answer at all
        self.names: dict[int, str] = {}  # node id -> site name, from the sites' replies

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.shapes = {name: tuple(array.shape) for name, array in arrays.items()}
        floor = self.min_available_nodes
        self.min_available_nodes = max(floor, self.wait_for_nodes)
        try:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        finally:
            self.min_available_nodes, self.wait_for_nodes = floor, 0
        self.sampled = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.remember_names(replies)
        self.silent = self.sampled - {m.metadata.src_node_id for m in replies}
        kept, self.left_out = [], {}
        for message in replies:
            problem = None if message.has_error() else update_problem(message.content, self.shapes)
            if problem is None:
                kept.append(message)
                continue
            self.left_out[site_name(message)] = problem
            log.warning(
                "round %d: update of %s left out of the average: %s",
                server_round,
                site_name(message),
                problem,
            )
        return super().aggregate_train(server_round, sorted(kept, key=site_name))

    def remember_names(self, replies: list[Message]) -> None:
        for message in replies:
            if not message.has_error() and SITE_KEY in message.content.config_records:
                self.names[message.metadata.src_node_id] = site_name(message)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        kept = [m for m in messages if m.metadata.dst_node_id not in self.silent]
        if len(kept) < len(messages):
            log.warning(
                "round %d: %d site(s) that did not answer the training are not asked to validate",
                server_round,
                len(messages) - len(kept),
            )
        return kept

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self.remember_names(replies)
        usable = [m for m in replies if m.has_error() or _has_weight(m.content)]
        return super().aggregate_evaluate(server_round, sorted(usable, key=site_name))


def _has_weight(content: RecordDict) -> bool:
    """Validation replies of sites without validation cases carry no weight."""
    metrics = list(content.metric_records.values())
    return len(metrics) == 1 and float(metrics[0].get(WEIGHT_KEY, 0)) > 0
