"""The ServerApp: FedAvg rounds with validation, best-model tracking, early stopping,
per-round checkpoints, resumption after a crash, and export of the best model.

Each round (the paper's FedAvg): every connected site trains ``local-epochs`` from the global
model and replies; :class:`~train.strategy.RobustFedAvg` averages the usable replies weighted
by training cases; every site then validates the new global model on its held-out cases and
the server averages the scores weighted by validation cases. A site that does not answer
within ``round-timeout`` seconds (crashed, disconnected) is logged and the round completes
with the others. The model with the best validation Dice is kept; after ``patience`` rounds
without a better one (after ``lr-drops`` restarts from it at a tenth of the learning rate each,
as ReduceLROnPlateau does), or ``num-rounds`` rounds, it is exported to ``out-dir``.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import flwr
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.server.compat import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

from model.network import VesselUNet
from train.checkpoint import (
    PAUSE,
    PAUSED,
    RunState,
    contiguous,
    fold_dir,
    load_checkpoint,
    pause_requested,
    save_checkpoint,
    training_lock,
)
from train.config import TrainConfig, learning_rate, site_config
from train.export import export_fold
from train.strategy import (
    SITE_KEY,
    WEIGHT_KEY,
    SecAggPlusBridge,
    build_strategy,
    guard,
    site_name,
)

log = logging.getLogger("flwr").getChild("train")
VALIDATION_KEYS = ("dice", "cldice", "clre", "clpr")
SITE_VALIDATION_KEYS = (*VALIDATION_KEYS, "site-seconds")


def initial_arrays(config: TrainConfig) -> dict[str, np.ndarray]:
    """The seeded initial global model, or the model of ``init-weights`` (a round checkpoint
    or a shipped fp16 fold file) for a warm start, in the architecture's fp32 layout."""
    torch.manual_seed(config.seed)
    fresh = {k: v.numpy().copy() for k, v in VesselUNet(config.architecture).state_dict().items()}
    if not config.init_weights:
        return fresh
    path = Path(config.init_weights)
    try:
        loaded = load_safetensors(path.read_bytes())
    except (OSError, SafetensorError) as error:
        raise ValueError(f"init-weights {path}: cannot be read ({error})") from None
    wrong = sorted(set(fresh) ^ set(loaded)) or sorted(
        k for k in fresh if fresh[k].shape != loaded[k].shape
    )
    if wrong:
        raise ValueError(f"init-weights {path}: not this architecture ({', '.join(wrong[:3])})")
    return {k: loaded[k].astype(fresh[k].dtype) for k in fresh}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(contiguous(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def site_reports(replies: list[Message], keys: tuple[str, ...]) -> dict[str, dict]:
    """Per-site weight, ``keys`` metrics and dataset description of successful replies."""
    reports = {}
    for message in replies:
        if message.has_error():
            continue
        metrics = next(iter(message.content.metric_records.values()), {})
        info = message.content.config_records.get(SITE_KEY, {})
        reports[site_name(message)] = {
            "cases": int(metrics.get(WEIGHT_KEY, 0)),
            **{k: float(metrics[k]) for k in keys if k in metrics},
            **{k: str(v) for k, v in info.items() if k != "name"},
        }
    return reports


def error_summary(reason: str) -> str:
    """A site's error reply in one line: the raised exception's message, not the transport's
    wrapping (``<class 'E'>:<'message'>``, or Ray's traceback ending in
    ``... occurred. Message: message'>``), at most 300 characters."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    last = lines[-1] if lines else reason.strip()
    if "Message: " in last:
        last = last.split("Message: ", 1)[1]
    elif match := re.fullmatch(r"<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)", last):
        last = f"{match[1]}: {match[2]}"
    return last.removesuffix("'>")[:300]


def failures(
    messages: list[Message],
    replies: list[Message],
    names: dict[int, str],
    errors: dict[int, str] | None = None,
) -> list[str]:
    """Why asked sites gave no usable reply (error replies, ``errors`` by node as SecAgg+ saw
    them, silence), by site name where known."""
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    answered, reasons = set(), {}
    for reply in replies:
        node = asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        answered.add(node)
        if reply.has_error():
            reasons[node] = reply.error.reason
    for node, reason in (errors or {}).items():
        if node not in answered:
            answered.add(node)
            reasons[node] = reason

    def site(node: int) -> str:
        return names.get(node, f"node {node}")

    nodes = dict.fromkeys(m.metadata.dst_node_id for m in messages)  # in order, once each
    silent = [node for node in nodes if node not in answered]
    return [f"{site(node)}: {error_summary(reason)}" for node, reason in reasons.items()] + [
        f"{site(node)} did not reply within round-timeout" for node in silent
    ]


def secure_training(
    grid: Grid, messages: list[Message], config: TrainConfig, server_round: int, arrays: ArrayRecord
) -> tuple[list[Message], dict[int, str]]:
    """The sites' replies to their training ``messages`` through Flower's SecAgg+: each reply
    carries the site's metrics and the securely aggregated model, never the site's own (see
    :class:`SecAggPlusBridge`); and why sites dropped out, by node."""
    bridge = SecAggPlusBridge(messages, grid)
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=bridge)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    workflow = SecAggPlusWorkflow(
        num_shares=config.secagg_num_shares,
        reconstruction_threshold=config.secagg_reconstruction_threshold,
        max_weight=config.secagg_max_weight,
        timeout=config.round_timeout,
    )
    workflow(bridge.grid, context)
    return bridge.replies, bridge.grid.errors


def play_round(
    grid: Grid,
    strategy: Strategy,
    config: TrainConfig,
    server_round: int,
    arrays: dict[str, np.ndarray],
    lr_drops_done: int = 0,
) -> tuple[dict[str, np.ndarray], dict]:
    """One FedAvg round and its validation; returns the new global model and the round's record."""
    start = time.monotonic()
    settings, sent = site_config(config, lr_drops_done), to_record(arrays)
    messages = list(strategy.configure_train(server_round, sent, ConfigRecord(settings), grid))
    refusals = {}
    if config.secagg:
        replies, refusals = secure_training(grid, messages, config, server_round, sent)
    else:
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
    trained = time.monotonic()
    averaged, train_metrics = strategy.aggregate_train(server_round, replies)
    if averaged is None:
        log.warning("round %d: no usable update; the global model stays as it was", server_round)
    else:
        arrays = from_record(averaged)
    evaluations = list(
        strategy.configure_evaluate(server_round, to_record(arrays), ConfigRecord(settings), grid)
    )
    scores = list(grid.send_and_receive(evaluations, timeout=config.round_timeout))
    validation = strategy.aggregate_evaluate(server_round, scores)
    record = {
        "round": server_round,
        "train": {
            "sites": site_reports(replies, ("train-loss", "train-seconds", "site-seconds")),
            "loss": float(train_metrics["train-loss"]) if train_metrics else None,
            "learning_rate": settings["learning-rate"],
            "left_out": dict(guard(strategy).left_out),
            "failures": failures(messages, replies, guard(strategy).names, refusals),
            "seconds": trained - start,
        },
        "validation": {
            "sites": site_reports(scores, SITE_VALIDATION_KEYS),
            **({k: float(validation[k]) for k in VALIDATION_KEYS} if validation else {}),
            "failures": failures(evaluations, scores, guard(strategy).names),
            "seconds": time.monotonic() - trained,
        },
        "seconds": time.monotonic() - start,
    }
    for problem in record["train"]["failures"] + record["validation"]["failures"]:
        log.warning("round %d: %s", server_round, problem)
    return arrays, record


def update_state(state: RunState, record: dict) -> bool:
    """Fold a round's record into the state; True when its model is the best so far.

    Raises ValueError when a site trains on another number of cases than the run started
    with (a resumed run would otherwise mix two datasets silently); other changes to its files
    are logged: phantoms regenerated on another CPU may differ in a few rounded voxels."""
    for name, report in record["train"]["sites"].items():
        known = state.sites.get(name, {})
        if known.get("training_cases", report["cases"]) != report["cases"]:
            raise ValueError(
                f"{name}: trains on {report['cases']} cases, this run started with "
                f"{known['training_cases']}; train on the data it started with, or start "
                "afresh (--fresh)"
            )
        if known.get("fingerprint", report.get("fingerprint")) != report.get("fingerprint"):
            log.warning(
                "%s: dataset files differ from when this run started (fingerprint %s -> %s)",
                name,
                known["fingerprint"],
                report.get("fingerprint"),
            )
    state.round = record["round"]
    state.history.append(record)
    state.training_seconds += record["seconds"]
    for name, report in record["train"]["sites"].items():
        state.sites.setdefault(name, {}).update(
            {
                "training_cases": report["cases"],
                **{k: report[k] for k in ("dataset", "fingerprint") if k in report},
            }
        )
    for name, report in record["validation"]["sites"].items():
        state.sites.setdefault(name, {})["validation_cases"] = report["cases"]
    dice = record["validation"].get("dice")
    if dice is not None and dice > state.best_dice:
        state.best_round, state.best_dice = record["round"], dice
        state.best_metrics = {k: record["validation"][k] for k in VALIDATION_KEYS}
        state.rounds_without_improvement = 0
        return True
    state.rounds_without_improvement += 1
    return False


def describe_data(sim_data_root: str) -> str:
    """Where the training data came from, without this machine's absolute paths."""
    if not sim_data_root:
        return "site datasets (nnU-Net raw layout), kept at the sites"
    root = Path(sim_data_root).resolve()
    if root.is_relative_to(Path.cwd()):
        root = root.relative_to(Path.cwd())
    return f"simulated sites under {root}"


def provenance(state: RunState, config: TrainConfig) -> dict:
    return {
        "fold": config.fold,
        "framework": f"Flower {flwr.__version__}",
        "data": describe_data(config.sim_data_root),
        "sites": state.sites,
        "rounds": state.round,
        "best_round": state.best_round,
        "stop_reason": state.stop_reason,
        "validation": state.best_metrics,
        "training_seconds": round(state.training_seconds, 1),
        "seed": config.seed,
        "initialised_from": Path(config.init_weights).name if config.init_weights else "seed",
        "patch_size": list(config.patch_shape),
        "local_epochs": config.local_epochs,
        "patches_per_case": config.patches_per_case,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        **({"lr_drops": state.lr_drops_done} if state.lr_drops_done else {}),
        "loss": f"BCE + {config.loss_alpha:g} WBCE + {1 - config.loss_alpha:g} Dice",
        "precision": config.precision,
        **aggregation_provenance(config),
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def aggregation_provenance(config: TrainConfig) -> dict:
    """How the sites' models were combined, where it is not the paper's plain FedAvg."""
    entries: dict = {}
    if config.aggregation != "fedavg":
        beta = f" (beta {config.trim_beta:g})" if config.aggregation == "trimmed-mean" else ""
        entries["aggregation"] = config.aggregation + beta
    if config.differential_privacy:
        entries["differential_privacy"] = {
            "mechanism": "Flower client-side fixed clipping, Gaussian noise on the aggregate",
            "clipping_norm": config.dp_clipping_norm,
            "noise_multiplier": config.dp_noise_multiplier,
            "sites": config.wait_for_sites,
        }
    if config.secagg:
        entries["secure_aggregation"] = "Flower SecAgg+"
    return entries


def run_training(grid: Grid, config: TrainConfig) -> RunState:
    """Train fold ``config.fold`` from scratch or from its last checkpoint, then export it,
    unless a ``PAUSE`` file stops it after a round (the same command then resumes)."""
    directory = fold_dir(config)
    directory.mkdir(parents=True, exist_ok=True)
    with training_lock(directory):
        return _train_fold(grid, config, directory)


def finished(state: RunState, config: TrainConfig) -> bool:
    """Whether the run has reached its round cap, or its patience with no drop left."""
    return state.round >= config.num_rounds or (
        plateaued(state, config) and state.lr_drops_done >= config.lr_drops
    )


def plateaued(state: RunState, config: TrainConfig) -> bool:
    return state.rounds_without_improvement >= config.patience


def _train_fold(grid: Grid, config: TrainConfig, directory: Path) -> RunState:
    saved = load_checkpoint(directory, config)
    if saved is None:
        state, arrays, best = RunState(config=config.to_run_config()), initial_arrays(config), None
    else:
        state, arrays, best = saved
        log.info("resuming fold %d after round %d from %s", config.fold, state.round, directory)
    strategy = build_strategy(config)
    while not finished(state, config):
        if plateaued(state, config):  # a drop is left: go on from the best model, slower
            arrays = best if best is not None else arrays
            state.lr_drops_done += 1
            state.rounds_without_improvement = 0
            log.info(
                "fold %d: no better validation Dice for %d rounds; from round %d's model at "
                "learning rate %g",
                config.fold,
                config.patience,
                state.best_round,
                learning_rate(config, state.lr_drops_done),
            )
        arrays, record = play_round(
            grid, strategy, config, state.round + 1, arrays, state.lr_drops_done
        )
        improved = update_state(state, record)
        best = arrays if improved else best
        # A finished run exports, whatever was asked.
        paused = not finished(state, config) and pause_requested(directory)
        state.stop_reason = PAUSED if paused else ""
        save_checkpoint(directory, state, arrays, arrays if improved else None)
        log.info(
            "round %d: loss %s, validation Dice %s clDice %s (best %.4f in round %d), %.1f s",
            state.round,
            _fmt(record["train"]["loss"]),
            _fmt(record["validation"].get("dice")),
            _fmt(record["validation"].get("cldice")),
            state.best_dice,
            state.best_round,
            record["seconds"],
        )
        if paused:
            log.info("fold %d: paused after round %d", config.fold, state.round)
            return state
    (directory / PAUSE).unlink(missing_ok=True)  # asked too late: the run has finished
    state.stop_reason = (
        f"no better validation Dice for {config.patience} rounds"
        + (f" after {state.lr_drops_done} learning-rate drops" if state.lr_drops_done else "")
        if plateaued(state, config)
        else "num-rounds reached"
    )
    if best is None:
        log.warning("no round was validated: exporting the last global model")
        best = arrays
    manifest = export_fold(best, config, config.out_dir, provenance(state, config))
    save_checkpoint(directory, state, arrays, None)
    log.info(
        "fold %d: %s; best round %d exported to %s",
        config.fold,
        state.stop_reason,
        state.best_round,
        manifest,
    )
    return state


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def build_server_app(overrides: dict | None = None) -> ServerApp:
    """The ServerApp; ``overrides`` (run config keys) win over ``context.run_config``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_training(grid, TrainConfig.from_run_config({**context.run_config, **(overrides or {})}))

    return app


app = build_server_app()
