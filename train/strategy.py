"""FedAvg that a broken site cannot poison, and whose average does not depend on reply order;
the robust and private alternatives that the run configuration selects.

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

:func:`build_strategy` puts the same guard in front of Flower's ``FedTrimmedAvg`` or
``FedMedian`` (``aggregation``), which bound what one site sending a scaled or sign-flipped
model can do, and wraps the result in Flower's ``DifferentialPrivacyClientSideFixedClipping``
(``dp-clipping-norm``, ``dp-noise-multiplier``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)

from train.config import TrainConfig

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


class GuardedAggregation:
    """In front of a Flower strategy (FedAvg or a subclass): leave out non-finite or malformed
    updates, aggregate in site-name order, spare silent sites the validation.

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


class RobustFedAvg(GuardedAggregation, FedAvg):
    """The paper's FedAvg weighted by training cases, guarded."""


class RobustFedTrimmedAvg(GuardedAggregation, FedTrimmedAvg):
    """Flower's coordinate-wise trimmed mean (unweighted), guarded."""


class RobustFedMedian(GuardedAggregation, FedMedian):
    """Flower's coordinate-wise median (unweighted), guarded."""


def build_strategy(config: TrainConfig) -> Strategy:
    """The run's strategy: the ``aggregation`` choice, guarded, wrapped in Flower's client-side
    fixed-clipping DP when ``dp-clipping-norm`` is set (noise added to the aggregate)."""
    nodes = {
        "wait_for_nodes": config.wait_for_sites,
        "min_available_nodes": config.min_sites,
        "min_train_nodes": config.min_sites,
        "min_evaluate_nodes": config.min_sites,
    }
    if config.aggregation == "median":
        strategy = RobustFedMedian(**nodes)
    elif config.aggregation == "trimmed-mean":
        strategy = RobustFedTrimmedAvg(beta=config.trim_beta, **nodes)
    else:
        strategy = RobustFedAvg(**nodes)
    if not config.differential_privacy:
        return strategy
    log.info(
        "differential privacy: updates clipped to L2 norm %g at the sites, Gaussian noise of "
        "multiplier %g added to the aggregate of %d sites",
        config.dp_clipping_norm,
        config.dp_noise_multiplier,
        config.wait_for_sites,
    )
    return DifferentialPrivacyClientSideFixedClipping(
        strategy,
        noise_multiplier=config.dp_noise_multiplier,
        clipping_norm=config.dp_clipping_norm,
        num_sampled_clients=config.wait_for_sites,
    )


def guard(strategy: Strategy) -> GuardedAggregation:
    """The guarded strategy inside Flower's wrappers (DP), whose bookkeeping the server reads."""
    while not isinstance(strategy, GuardedAggregation):
        strategy = strategy.strategy
    return strategy


def _has_weight(content: RecordDict) -> bool:
    """Validation replies of sites without validation cases carry no weight."""
    metrics = list(content.metric_records.values())
    return len(metrics) == 1 and float(metrics[0].get(WEIGHT_KEY, 0)) > 0


# --- SecAgg+ (Flower 1.42 runs it as a workflow for legacy strategies only) ---------------

NAMES_KEY = "secagg-array-names"  # FitIns config: the model's array names, newline-separated
SITE_PREFIX = "site."  # FitRes metrics: the site record's fields travel under this prefix


class ErrorNotingGrid:
    """Flower's grid, noting each site's error reply: SecAgg+ drops a site that fails at any
    stage and keeps only an anonymous count, so that a site's refusal would otherwise read as
    silence."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                self.errors.setdefault(reply.metadata.src_node_id, reply.error.reason)
        return replies

    def __getattr__(self, name: str):
        return getattr(self.grid, name)


class SecAggPlusBridge(LegacyStrategy):
    """What Flower's ``SecAggPlusWorkflow`` asks of a (legacy) strategy, answered for one
    training round of a Message-API strategy.

    ``configure_fit`` hands out the round's training messages as FitIns. The workflow masks,
    sums and unmasks the sites' models and calls ``aggregate_fit`` with one FitRes per site
    in which the parameters are already the weighted average (each site's own metrics stay):
    these become :attr:`replies` for the strategy's ``aggregate_train``, which therefore only
    ever sees the aggregate.
    """

    def __init__(self, messages: list[Message], grid: Grid) -> None:
        self.messages = {m.metadata.dst_node_id: m for m in messages}
        self.grid = ErrorNotingGrid(grid)  # the workflow's grid: sites' refusals by node
        self.replies: list[Message] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [
            (GridClientProxy(node, self.grid, m.metadata.run_id), _fit_ins(m))
            for node, m in self.messages.items()
        ]

    def aggregate_fit(self, server_round, results, failures):
        self.replies = [_site_reply(self.messages[p.node_id], res) for p, res in results]
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _fit_ins(message: Message) -> FitIns:
    arrays = message.content["arrays"]
    config = {**message.content["config"], NAMES_KEY: "\n".join(arrays.keys())}
    return FitIns(compat.arrayrecord_to_parameters(arrays, keep_input=True), config)


def _site_reply(message: Message, result: FitRes) -> Message:
    """A site's reply as the Message-API strategy expects it, holding the secure aggregate."""
    sent = message.content["arrays"]
    aggregate = parameters_to_ndarrays(result.parameters)
    arrays = {name: _like(a, sent[name].numpy()) for name, a in zip(sent, aggregate, strict=True)}
    metrics = {k: v for k, v in result.metrics.items() if not k.startswith(SITE_PREFIX)}
    site = {k.removeprefix(SITE_PREFIX): v for k, v in result.metrics.items() if k not in metrics}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({**metrics, WEIGHT_KEY: result.num_examples}),
            SITE_KEY: ConfigRecord(site),
        }
    )
    sent_meta = message.metadata
    metadata = Metadata(
        run_id=sent_meta.run_id,
        message_id="",
        src_node_id=sent_meta.dst_node_id,
        dst_node_id=sent_meta.src_node_id,
        reply_to_message_id=f"secagg+{sent_meta.dst_node_id}",
        group_id=sent_meta.group_id,
        created_at=time.time(),
        ttl=sent_meta.ttl,
        message_type=sent_meta.message_type,
    )
    return Message(content=content, metadata=metadata)


def _like(values: np.ndarray, model: np.ndarray) -> np.ndarray:
    """The dequantized aggregate (float64, scalars as shape (1,)) in the model's dtype and shape."""
    values = np.rint(values) if model.dtype.kind in "iu" else values
    return np.ascontiguousarray(values, dtype=model.dtype).reshape(model.shape)
