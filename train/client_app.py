"""The ClientApp of a site: load its data, train or validate the global model, reply.

The site's dataset is ``node_config["data-path"]`` (``flower-supernode --node-config
'data-path="/data/vessels"'``); in a simulation, where nodes are numbered, simulated node
``partition-id`` reads the ``partition-id``-th site folder (sorted) under ``sim-data-root``.
Its cases are preprocessed once into the site's cache (``$VESSEL_SEG_TRAIN_CACHE``, see
:mod:`train.data`) and read patch by patch, by ``$VESSEL_SEG_LOADER_WORKERS`` processes.
A reply holds only the model's state arrays, scalar metrics (loss, scores, case counts,
seconds spent) and the site's name and dataset fingerprint (a hash of case names and file
sizes): no image, label or case name leaves the site. A site refuses a message whose server
normalises intensities otherwise than the site's own code (:func:`check_normalization`).

With privacy switched on by the server, Flower's mods stand in front of the training:
``fixedclipping_mod`` bounds the site's update (differential privacy: the server adds the
noise to the aggregate) and ``secaggplus_mod`` masks the model so that the server can only
sum it with the other sites' (SecAgg+). Each acts only on the messages that ask for it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from inference.preprocessing import DEFAULT_NORMALIZATION, normalization_differences
from train.config import NORMALIZATION_KEY, TrainConfig
from train.data import Site, list_cases, load_site
from train.strategy import NAMES_KEY, SITE_KEY, SITE_PREFIX, WEIGHT_KEY
from train.task import build_network, train_site, validate_site


def site_path(context: Context, data_root: str | None = None) -> Path:
    """The node's dataset folder (see module docstring)."""
    node = context.node_config
    if "data-path" in node:
        return Path(str(node["data-path"]))
    root = data_root or str(context.run_config.get("sim-data-root", ""))
    if not root or "partition-id" not in node:
        raise ValueError(
            "this SuperNode has no dataset: start it with --node-config 'data-path=\"DIR\"'"
        )
    sites = sorted(p for p in Path(root).iterdir() if p.is_dir())
    index = int(node["partition-id"])
    if index >= len(sites):
        raise ValueError(f"{root}: simulated node {index} has no site folder ({len(sites)} found)")
    return sites[index]


def fingerprint(root: Path) -> str:
    """A short hash of the dataset's case names and file sizes (identifies it, reveals nothing)."""
    digest = hashlib.sha256()
    for name, (image, label) in sorted(list_cases(root).items()):
        digest.update(f"{name}:{image.stat().st_size}:{label.stat().st_size};".encode())
    return digest.hexdigest()[:16]


def site_record(site: Site, context: Context) -> ConfigRecord:
    description = site.path / "dataset.json"
    dataset = ""
    if description.is_file():
        dataset = str(json.loads(description.read_text()).get("name", ""))
    return ConfigRecord(
        {
            "name": str(context.node_config.get("site-name", site.name)),
            "dataset": dataset,
            "fingerprint": fingerprint(site.path),
        }
    )


def open_site(context: Context, config: TrainConfig, data_root: str | None) -> Site:
    name = context.node_config.get("site-name")
    return load_site(site_path(context, data_root), config.spacing, str(name) if name else None)


PRIVATE_KEY = "private-update"  # set on the training messages of SecAgg+ (see legacy_training)


def received(message: Message) -> tuple[TrainConfig, int, dict, bool]:
    """The run configuration, the server round and the global model of a server message, and
    whether the update is private (clipped for DP, or securely aggregated)."""
    settings = dict(message.content["config"])
    server_round = int(settings.pop("server-round", 0))
    check_normalization(settings.pop(NORMALIZATION_KEY, None))
    private = [settings.pop(key, None) for key in (KEY_CLIPPING_NORM, PRIVATE_KEY)]
    state = message.content["arrays"].to_torch_state_dict()
    config = TrainConfig.from_run_config(settings)
    return config, server_round, state, any(v is not None for v in private)


def check_normalization(sent: str | None) -> None:
    """Refuse a round whose server normalises intensities otherwise than this site: a site on
    other software would train the shared model on inputs at another scale, silently."""
    if sent is None:
        raise ValueError(
            "the server sent no intensity normalization: run one software version on the "
            "server and at every site"
        )
    differences = normalization_differences(DEFAULT_NORMALIZATION, json.loads(sent))
    if not differences:
        return
    differing = "; ".join(
        f"{k} {shown(here)} here, {shown(there)} there" for k, (here, there) in differences.items()
    )
    raise ValueError(
        "intensity normalization differs from the server's; run one software version on the "
        f"server and at every site: {differing}"
    )


def shown(setting: object) -> str:
    """A normalisation setting as an error message names it."""
    return "unset" if setting is None else str(setting)


def reply_arrays(net: torch.nn.Module, sent: ArrayRecord, private: bool) -> ArrayRecord:
    """The trained model. A private update sends integer buffers (batch norm's
    ``num_batches_tracked``, a counter that momentum makes unused) back as received, as
    floats, in the order received: Flower's clipping scales every array of the update,
    which integer arrays cannot take, and a growing counter would spend the clipping norm."""
    state = net.state_dict()
    if not private:
        return ArrayRecord(state)

    def value(name: str) -> np.ndarray:
        if state[name].is_floating_point():
            return state[name].numpy()
        return sent[name].numpy().astype(np.float32)

    return ArrayRecord({name: Array(value(name)) for name in sent})


def clipping_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` on the training messages that carry a clipping norm
    (``DifferentialPrivacyClientSideFixedClipping`` on the server puts it there)."""
    config = message.content.config_records.get("config", {})
    if message.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)


def secure_aggregation_mod(
    message: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Flower's ``secaggplus_mod`` on the messages of the server's ``SecAggPlusWorkflow``."""
    if RECORD_KEY_CONFIGS not in message.content.config_records:
        return call_next(message, context)
    return secaggplus_mod(message, context, lambda m, c: legacy_training(m, c, call_next))


def legacy_training(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train on SecAgg+'s message, whose model comes as a legacy FitIns, and reply with the
    legacy FitRes that ``secaggplus_mod`` masks (the site record travels in its metrics)."""
    fit_ins = compat.recorddict_to_fitins(message.content, keep_input=True)
    settings = dict(fit_ins.config)
    names = str(settings.pop(NAMES_KEY)).split("\n")
    arrays = dict(zip(names, parameters_to_ndarrays(fit_ins.parameters), strict=True))
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord({**settings, PRIVATE_KEY: True}),
        }
    )
    reply = call_next(Message(content=content, metadata=message.metadata), context)
    if reply.has_error():
        return reply
    metrics = dict(reply.content["metrics"])
    cases = int(metrics.pop(WEIGHT_KEY))
    site = {SITE_PREFIX + k: v for k, v in reply.content[SITE_KEY].items()}
    parameters = ndarrays_to_parameters(reply.content["arrays"].to_numpy_ndarrays())
    fit_res = FitRes(Status(Code.OK, ""), parameters, cases, {**metrics, **site})
    return Message(compat.fitres_to_recorddict(fit_res, keep_input=True), reply_to=message)


def build_client_app(data_root: str | None = None) -> ClientApp:
    """The ClientApp; ``data_root`` maps simulated nodes to site folders (see ``site_path``)."""
    app = ClientApp(mods=[secure_aggregation_mod, clipping_mod])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        start = time.perf_counter()
        config, server_round, state, private = received(message)
        site = open_site(context, config, data_root)
        net = build_network(config, state)
        result, cases = train_site(net, site, config, server_round)
        arrays = reply_arrays(net, message.content["arrays"], private)
        metrics = MetricRecord(
            {
                WEIGHT_KEY: cases,
                "train-loss": result.loss,
                "train-steps": result.steps,
                "train-seconds": result.seconds,
                "site-seconds": time.perf_counter() - start,
            }
        )
        content = RecordDict(
            {
                "arrays": arrays,
                "metrics": metrics,
                SITE_KEY: site_record(site, context),
            }
        )
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        start = time.perf_counter()
        config, _, state, _ = received(message)
        site = open_site(context, config, data_root)
        scores, cases = validate_site(build_network(config, state), site, config)
        seconds = time.perf_counter() - start
        content = RecordDict(
            {
                "metrics": MetricRecord({WEIGHT_KEY: cases, **scores, "site-seconds": seconds}),
                SITE_KEY: site_record(site, context),
            }
        )
        return Message(content, reply_to=message)

    return app


app = build_client_app()
