"""The ClientApp of a site: load its data, train or validate the global model, reply.

The site's dataset is ``node_config["data-path"]`` (``flower-supernode --node-config
'data-path="/data/vessels"'``); in a simulation, where nodes are numbered, simulated node
``partition-id`` reads the ``partition-id``-th site folder (sorted) under ``sim-data-root``.
Its cases are preprocessed once into the site's cache (``$VESSEL_SEG_TRAIN_CACHE``, see
:mod:`train.data`) and read patch by patch, by ``$VESSEL_SEG_LOADER_WORKERS`` processes.
A reply holds only the model's state arrays, scalar metrics (loss, scores, case counts,
seconds spent) and the site's name and dataset fingerprint (a hash of case names and file
sizes): no image, label or case name leaves the site."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from train.config import TrainConfig
from train.data import Site, list_cases, load_site
from train.strategy import SITE_KEY, WEIGHT_KEY
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


def received(message: Message) -> tuple[TrainConfig, int, dict]:
    """The run configuration, the server round and the global model of a server message."""
    settings = dict(message.content["config"])
    server_round = int(settings.pop("server-round", 0))
    state = message.content["arrays"].to_torch_state_dict()
    return TrainConfig.from_run_config(settings), server_round, state


def build_client_app(data_root: str | None = None) -> ClientApp:
    """The ClientApp; ``data_root`` maps simulated nodes to site folders (see ``site_path``)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        start = time.perf_counter()
        config, server_round, state = received(message)
        site = open_site(context, config, data_root)
        net = build_network(config, state)
        result, cases = train_site(net, site, config, server_round)
        arrays = ArrayRecord(net.state_dict())
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
        config, _, state = received(message)
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
