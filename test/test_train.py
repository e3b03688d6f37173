"""Federated training: configuration, folds, loss, patches, FedAvg, checkpoints, export, privacy,
and the simulated federation (Flower's simulation engine, 3 phantom sites, real files)."""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from safetensors.numpy import load as safetensors_load

from inference.preprocessing import DEFAULT_NORMALIZATION, LEGACY_NORMALIZATION, normalize
from model.weights import WeightError, load_fold, load_manifest
from phantoms.generator import generate_volume
from train.checkpoint import (
    PAUSE,
    PAUSED_EXIT,
    RunState,
    compact,
    load_checkpoint,
    pause,
    pause_requested,
    save_checkpoint,
    training_lock,
)
from train.config import NORMALIZATION_KEY, TrainConfig, site_config
from train.data import Case, SiteDataError, list_cases, load_case, load_site
from train.export import export_fold
from train.folds import split_cases
from train.loss import positive_weight, vessel_loss
from train.sampling import (
    PatchSettings,
    augment,
    augment_intensity,
    augment_levels,
    crop,
    epoch_batches,
    make_patch,
    sample_patch,
)
from train.server_app import error_summary, failures, initial_arrays, run_training, update_state
from train.strategy import RobustFedAvg
from train.task import (
    autocast_dtype,
    build_network,
    cpu_bf16_backward_safe,
    fit,
    predict_mask,
    validation_predictor,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "patch-size": 32,
    "base-channels": 4,
    "patches-per-case": 2,
    "val-overlap": 0.0,
    "precision": "fp32",
}


def tiny_config(tmp_path: Path, **changes) -> TrainConfig:
    settings = {
        **TINY,
        "run-dir": str(tmp_path / "runs"),
        "out-dir": str(tmp_path / "weights"),
        **changes,
    }
    return TrainConfig.from_run_config(settings)


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> list[Path]:
    """Three phantom sites, three 32^3 cases each, in the nnU-Net raw layout."""
    from phantoms import write_dataset

    return write_dataset(tmp_path_factory.mktemp("federation"), 3, (32, 32, 32), 5, sites=3)


# --- configuration and folds -------------------------------------------------------------


def test_pyproject_run_config_matches_the_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["config"] == TrainConfig().to_run_config()
    assert app["components"] == {
        "serverapp": "train.server_app:app",
        "clientapp": "train.client_app:app",
    }


def test_run_config_is_read_and_checked():
    config = TrainConfig.from_run_config({"learning-rate": 1, "augment": "false", "fold": 2.0})
    assert config.learning_rate == 1.0 and config.augment is False and config.fold == 2
    for bad, message in (
        ({"fold": 5}, "fold 5"),
        ({"patch-size": 40}, "multiple of 16"),
        ({"precision": "fp8"}, "precision"),
        ({"paatch-size": 32}, "unknown"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_run_config(bad)
    assert "run-dir" not in site_config(TrainConfig())


def test_folds_partition_every_site_into_fifths():
    names = [f"case_{i:03d}" for i in range(13)]
    validations = [split_cases(random.sample(names, len(names)), f)[1] for f in range(5)]
    assert sorted(sum(validations, [])) == names  # disjoint, and every case validates once
    assert [len(v) for v in validations] == [3, 3, 3, 2, 2]
    training, validation = split_cases(names, 1)
    assert set(training).isdisjoint(validation) and len(training) + len(validation) == 13
    assert split_cases(["b", "a", "c"], 4) == (["a", "c"], ["b"])  # small site: case 4 mod 3
    with pytest.raises(ValueError, match="at least 2"):
        split_cases(["only"], 0)


# --- loss and patches ---------------------------------------------------------------------


def test_loss_is_bce_plus_weighted_bce_plus_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, 16)
    target = (torch.rand(2, 16, 16, 16) > 0.9).float()
    p = torch.softmax(logits, dim=1)[:, 1].double()
    t = target.double()
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    wbce = -(7.0 * t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    expected = bce + 0.6 * wbce + 0.4 * dice
    assert float(vessel_loss(logits, target, 7.0, 0.6)) == pytest.approx(float(expected), 1e-5)
    assert positive_weight(0.02) == pytest.approx(7.0)  # sqrt(0.98 / 0.02)
    assert positive_weight(0.9) == 1.0


def small_case(shape=(20, 24, 28)) -> Case:
    rng = np.random.default_rng(3)
    label = np.zeros(shape, bool)
    label[shape[0] // 2, shape[1] // 2 - 2 : shape[1] // 2 + 2, shape[2] // 2] = True
    image = rng.random(shape, dtype=np.float32)
    return Case("c", image, label, np.flatnonzero(label))


def test_patches_are_biased_towards_vessels_and_padded():
    case = small_case((40, 40, 40))
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, label = sample_patch(case, (16, 16, 16), rng, foreground_fraction=1.0)
        assert image.shape == (16, 16, 16) and label[8, 8, 8]  # centred on a vessel voxel
    uniform = [sample_patch(case, (16, 16, 16), rng, 0.0)[1].any() for _ in range(200)]
    assert 0 < np.mean(uniform) < 0.5
    small = small_case()
    padded = crop(small.image, (-2, 0, 0), (32, 32, 32))
    assert padded.shape == (32, 32, 32) and not padded[:2].any()
    assert np.array_equal(padded[2:22, :24, :28], small.image)


def test_augmentation_moves_image_and_label_together():
    image = np.arange(16**3, dtype=np.float32).reshape((16,) * 3)
    label = image % 7 == 0
    rng = np.random.default_rng(1)
    for _ in range(10):
        moved_image, moved_label = augment(image, label, rng)
        assert np.array_equal(moved_label, moved_image % 7 == 0)
        assert sorted(moved_image.ravel()) == sorted(image.ravel())


def test_zoomed_patches_keep_the_vessel_centred_and_rescale_it():
    case = small_case((48, 48, 48))
    case.label[:] = False
    case.label[20:28, 20:28, 20:28] = True  # an 8-voxel cube
    case.image = case.label.astype(np.float32)
    case.foreground = np.array([np.ravel_multi_index((24, 24, 24), case.label.shape)])
    rng = np.random.default_rng(0)
    for zoom, side in ((0.5, 16), (2.0, 4)):
        image, label = sample_patch(case, (16, 16, 16), rng, 1.0, zoom=zoom)
        assert image.shape == label.shape == (16, 16, 16) and image.dtype == np.float32
        assert label.sum() == pytest.approx(side**3, rel=0.35)
        assert np.array_equal(label, image >= 0.5)  # image and label moved together


def test_intensity_augmentation_is_seeded_and_varies_the_look():
    image = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)
    first = [augment_intensity(image, np.random.default_rng(s)) for s in range(40)]
    again = [augment_intensity(image, np.random.default_rng(s)) for s in range(40)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    changed = [not np.array_equal(a, image) for a in first]
    assert 0.3 < np.mean(changed) < 1.0  # each transform has its probability
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in first)
    spreads = {round(float(a.std()), 3) for a in first}
    assert len(spreads) > 5


def test_level_augmentation_moves_vessels_and_tissue_as_other_normalisations_do():
    """On a normalised phantom, the vessels' level after augmentation spans from where the
    case put them to the top of the range, tissue is lifted in some draws, the map keeps the
    voxels' order, and the switch reaches the patches."""
    phantom = generate_volume((48, 48, 48), seed=2)
    image = normalize(phantom.image.astype(np.float32))
    vessels, tissue = phantom.label > 0, phantom.label == 0
    draws = [augment_levels(image, np.random.default_rng(s)) for s in range(60)]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(draws, [augment_levels(image, np.random.default_rng(s)) for s in range(60)])
    )
    vessel_levels = [float(np.median(d[vessels])) for d in draws]
    assert min(vessel_levels) == pytest.approx(np.median(image[vessels]), abs=1e-6)
    assert max(vessel_levels) > min(0.95, 2 * np.median(image[vessels]))
    tissue_levels = [float(np.median(d[tissue])) for d in draws]
    assert 0.1 < np.mean(np.array(tissue_levels) > np.median(image[tissue]) + 0.05) < 0.4
    top = DEFAULT_NORMALIZATION["upper_clip"]
    assert all(d.min() >= 0 and d.max() <= max(top, image.max()) for d in draws)
    assert max(d.max() for d in draws) > image.max()  # clipped where normalisation clips, not 1
    order = np.argsort(image.ravel(), kind="stable")
    assert all((np.diff(d.ravel()[order]) >= -1e-6).all() for d in draws)  # monotone
    case = Case("c", image, phantom.label > 0, np.flatnonzero(phantom.label))
    plain, levelled = (
        PatchSettings((32, 32, 32), 1.0, False, False, level_augmentation=on)
        for on in (False, True)
    )
    patches = [(make_patch(case, s, plain), make_patch(case, s, levelled)) for s in range(10)]
    assert all(np.array_equal(a[1], b[1]) for a, b in patches)  # labels unchanged
    assert sum(not np.array_equal(a[0], b[0]) for a, b in patches) >= 3


def test_an_epoch_draws_patches_per_case_in_batches():
    cases = [small_case(), small_case((32, 32, 32))]
    batches = list(epoch_batches(cases, (16, 16, 16), 5, 2, np.random.default_rng(0), 0.33, True))
    assert [b[0].shape for b in batches] == [(2, 1, 16, 16, 16)] * 5
    assert all(b[1].shape == (2, 16, 16, 16) and b[1].dtype == np.float32 for b in batches)


def test_cpu_bf16_training_is_refused_where_its_gradients_are_wrong():
    cpu = torch.device("cpu")
    assert not cpu_bf16_backward_safe(32) and not cpu_bf16_backward_safe(16)
    assert cpu_bf16_backward_safe(48) and cpu_bf16_backward_safe(64)
    assert autocast_dtype("auto", cpu, 32) is None
    assert autocast_dtype("fp32", cpu, 64) is None
    with pytest.raises(ValueError, match="bf16"):
        autocast_dtype("bf16", cpu, 32)
    assert autocast_dtype("bf16", cpu) == torch.bfloat16  # inference-only use is fine


def test_cpu_training_takes_bf16_only_with_amx_and_validation_wherever_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("train.task.cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert autocast_dtype("auto", cpu, 64) == torch.bfloat16
    assert autocast_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr("train.task.cpu_flags", lambda: frozenset({"avx512_bf16", "avx512_vnni"}))
    assert autocast_dtype("auto", cpu, 64) is None  # slower than fp32 without AMX
    assert autocast_dtype("auto", cpu) == torch.bfloat16  # the forward pass alone is faster
    monkeypatch.setattr("train.task.cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert autocast_dtype("auto", cpu, 64) is None and autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cpu, 64) == torch.bfloat16  # asked for, still given


def test_gpu_training_takes_bf16_only_where_native_and_scales_fp16_losses(monkeypatch):
    """A T4 or V100 emulates bf16 (torch's is_bf16_supported() still says yes): fp16 there,
    with the loss scaled so that small gradients survive; bf16 from Ampere on."""
    native = {"value": False}

    def is_bf16_supported(including_emulation=True):
        return True if including_emulation else native["value"]

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda")
    assert autocast_dtype("auto", cuda, 64) == torch.float16
    native["value"] = True
    assert autocast_dtype("auto", cuda, 64) == torch.bfloat16
    assert autocast_dtype("fp32", cuda, 64) is None

    # fp16 (run on the CPU here): a loss this small flushes every unscaled gradient to zero.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Conv3d(4, 2, 1))
    before = net[0].weight.detach().clone()
    images = np.random.default_rng(0).random((2, 1, 8, 8, 8), dtype=np.float32)
    batches = [(images, np.zeros((2, 8, 8, 8), np.float32))]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    result = fit(
        net, batches, lambda z, y: 1e-4 * z.mean(), optimizer, torch.device("cpu"), torch.float16
    )
    assert math.isfinite(result.loss) and result.steps == 1
    assert not torch.equal(net[0].weight, before), "fp16 gradients flushed to zero"


class Threshold(torch.nn.Module):
    """Logits whose vessel probability is sigmoid(image - 0.5), voxel by voxel."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), x - 0.5], dim=1)


def test_validation_stitches_sliding_windows_back_to_the_volume(tmp_path):
    image = np.random.default_rng(2).random((40, 21, 50), dtype=np.float32)
    for overlap in (0.0, 0.5):
        config = tiny_config(tmp_path, patch_size=32, val_overlap=overlap)
        predictor = validation_predictor(Threshold(), config, torch.device("cpu"))
        mask = predict_mask(predictor, image)
        assert mask.shape == image.shape and np.array_equal(mask, image > 0.5)


def test_validation_segments_exactly_as_the_container(tmp_path, monkeypatch):
    """One prediction path: the mask training validation scores is the mask ``process.py``
    writes for the same weights and case (without component cleaning, which is chosen on
    these masks)."""
    import process
    from phantoms import generate_case

    config = tiny_config(tmp_path, patch_size=32, base_channels=4, val_overlap=0.5)
    image, label = generate_case((48, 40, 36), seed=4, spacing=config.target_spacing)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(image, str(tmp_path / "in" / "c_0000.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "c.nii.gz"))
    case = load_case("c", tmp_path / "in" / "c_0000.nii.gz", tmp_path / "c.nii.gz", config.spacing)
    torch.manual_seed(3)
    net = build_network(config).eval()
    with torch.no_grad():  # centre the vessel logit: a mask neither empty nor full
        logits = net(torch.from_numpy(case.image[None, None, :32, :32, :32]))
        net.head.bias[1] -= float(torch.quantile(logits[0, 1] - logits[0, 0], 0.8))
    weights = tmp_path / "weights"
    export_fold({k: v.numpy() for k, v in net.state_dict().items()}, config, weights, {})
    net = load_fold(weights, load_manifest(weights), 0)  # the fp16 weights process.py reads
    monkeypatch.setenv("VESSEL_SEG_CACHE", str(tmp_path / "cache"))
    status = process.main(
        [
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--weights",
            str(weights),
            "--backend",
            "torch",
            "--device",
            "cpu",
            "--overlap",
            "0.5",
            "--no-postprocess",
        ]
    )
    assert status == 0
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "c.nii.gz")))
    validated = predict_mask(validation_predictor(net, config, torch.device("cpu")), case.image)
    assert 0.001 < validated.mean() < 0.9
    assert np.array_equal(validated, written.astype(bool))


# --- data ------------------------------------------------------------------------------------


def write_case(root: Path, name: str, label_size=(24, 20, 16), spacing=0.454) -> None:
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray((rng.random((16, 20, 24)) * 1000).astype(np.int16))
    label_array = np.zeros(label_size[::-1], np.uint8)
    label_array[8, 4:16, 12] = 1
    label = sitk.GetImageFromArray(label_array)
    for item in (image, label):
        item.SetSpacing((spacing,) * 3)
    sitk.WriteImage(image, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
    sitk.WriteImage(label, str(root / "labelsTr" / f"{name}.nii.gz"))


def test_site_data_is_preprocessed_like_inference(tmp_path):
    write_case(tmp_path, "a")
    image_path, label_path = list_cases(tmp_path)["a"]
    case = load_case("a", image_path, label_path, (0.227,) * 3)
    assert case.image.shape == case.label.shape == (32, 40, 48)  # resampled to 0.227 mm
    assert case.image.min() >= 0.0 and case.image.max() <= DEFAULT_NORMALIZATION["upper_clip"]
    assert case.label.any() and np.array_equal(np.flatnonzero(case.label), case.foreground)


def test_bad_site_data_is_named_in_one_line(tmp_path):
    with pytest.raises(SiteDataError, match="not an nnU-Net raw dataset"):
        list_cases(tmp_path)
    write_case(tmp_path, "a", label_size=(24, 20, 15))
    with pytest.raises(SiteDataError, match=r"a\.nii\.gz: size"):
        load_site(tmp_path, (0.454,) * 3)
    (tmp_path / "imagesTr" / "b_0000.nii.gz").write_bytes(b"")
    with pytest.raises(SiteDataError, match=r"b_0000\.nii\.gz: no label b\.nii\.gz"):
        list_cases(tmp_path)


# --- FedAvg without poison ----------------------------------------------------------------


def message(content: RecordDict, node: int, kind: str = MessageType.TRAIN) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def reply(node: int, arrays: dict, cases: int, site: str, loss: float = 0.5) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": cases, "train-loss": loss}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content, reply_to=message(RecordDict(), node))


@pytest.fixture
def serverapp_identity():
    """The identity Flower's runtime gives a ServerApp process (its messages carry it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class Nodes:
    """The one thing FedAvg asks of a Grid when sampling: the connected node ids."""

    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


def test_fedavg_weights_by_cases_and_leaves_out_non_finite_updates(caplog, serverapp_identity):
    rng = np.random.default_rng(0)
    shapes = {"w": (3, 4), "b": (4,)}
    updates = [
        {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(4)
    ]
    updates[3]["w"][1, 2] = np.nan
    replies = [
        reply(n + 1, u, cases, f"site{n + 1}")
        for n, (u, cases) in enumerate(zip(updates, (2, 5, 3, 4)))
    ]
    strategy = RobustFedAvg()
    list(
        strategy.configure_train(
            1,
            ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in shapes.items()}),
            ConfigRecord(),
            Nodes([1, 2, 3, 4, 5]),
        )
    )
    with caplog.at_level(logging.WARNING):
        averaged, metrics = strategy.aggregate_train(1, replies)
    assert "site4" in caplog.text and "non-finite" in caplog.text
    assert set(strategy.left_out) == {"site4"} and strategy.silent == {5}
    for key in shapes:  # equation (1): sum_k |D_k| / sum_j |D_j| theta_k over the finite sites
        expected = (2 * updates[0][key] + 5 * updates[1][key] + 3 * updates[2][key]) / 10
        np.testing.assert_allclose(averaged[key].numpy(), expected, rtol=1e-6)
    again, _ = strategy.aggregate_train(1, list(reversed(replies)))
    assert all(again[k].numpy().tobytes() == averaged[k].numpy().tobytes() for k in shapes)
    evaluations = strategy.configure_evaluate(1, averaged, ConfigRecord(), Nodes([1, 2, 3, 4, 5]))
    assert sorted(m.metadata.dst_node_id for m in evaluations) == [1, 2, 3, 4]
    asked = [message(RecordDict(), node) for node in (1, 2, 3, 4, 5)]
    assert failures(asked, replies, strategy.names) == ["node 5 did not reply within round-timeout"]


def test_a_sites_error_is_reported_by_its_own_message_in_one_line():
    """Flower wraps a ClientApp's exception (deployment: ``<class 'E'>:<'message'>``; the
    simulation engine: Ray's whole traceback); the round's record keeps the message."""
    problem = "/h/site3/labelsTr/a.nii.gz: not a readable image"
    deployed = f"<class 'train.data.SiteDataError'>:<'{problem}'>"
    assert error_summary(deployed) == f"SiteDataError: {problem}"
    simulated = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()\n"
        '  File "train/data.py", line 244, in load_case\n'
        f"train.data.SiteDataError: {problem}\n\nThe above exception was the direct cause\n"
        "flwr.clientapp.client_app.ClientAppException: \n"
        f"Exception ClientAppException occurred. Message: {problem}'>"
    )
    assert error_summary(simulated) == problem
    assert error_summary("x" * 400) == "x" * 300


def test_malformed_updates_are_left_out_too(serverapp_identity):
    good = {"w": np.ones((2, 2), np.float32)}
    strategy = RobustFedAvg()
    list(
        strategy.configure_train(
            1,
            ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))}),
            ConfigRecord(),
            Nodes([1, 2, 3]),
        )
    )
    averaged, _ = strategy.aggregate_train(
        1,
        [
            reply(1, good, 2, "a"),
            reply(2, {"w": np.ones((3, 2), np.float32)}, 2, "b"),
            reply(3, good, 2, "c", loss=math.inf),
        ],
    )
    assert set(strategy.left_out) == {"b", "c"}
    assert np.array_equal(averaged["w"].numpy(), good["w"])


# --- checkpoints and export -----------------------------------------------------------------


def test_checkpoint_resumes_and_refuses_another_run(tmp_path):
    config = tiny_config(tmp_path)
    arrays = initial_arrays(config)
    state = RunState(config=config.to_run_config(), round=3, best_round=2, best_dice=0.5)
    save_checkpoint(tmp_path, state, arrays, arrays)
    (tmp_path / "global-r0004.safetensors").write_bytes(b"interrupted write")
    loaded_state, loaded, best = load_checkpoint(tmp_path, config.replace(num_rounds=9))
    assert loaded_state.round == 3 and loaded_state.best_file == "best-r0002.safetensors"
    assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())
    assert loaded["encoders.0.1.num_batches_tracked"].shape == ()
    with pytest.raises(ValueError, match="seed 0 -> 1"):
        load_checkpoint(tmp_path, config.replace(seed=1))
    assert "pickle" not in (tmp_path / "state.json").read_text()
    # A run saved before a setting existed resumes with that setting at its default.
    saved = json.loads((tmp_path / "state.json").read_text())
    del saved["config"]["init-weights"]
    (tmp_path / "state.json").write_text(json.dumps(saved))
    assert load_checkpoint(tmp_path, config)[0].round == 3
    with pytest.raises(ValueError, match="init-weights '' -> 'x.safetensors'"):
        load_checkpoint(tmp_path, config.replace(init_weights="x.safetensors"))
    # A run whose sites normalised otherwise (here: written before the state recorded it, when
    # normalisation clipped at 1) is another run: its model reads other input levels.
    del saved["normalization"]
    (tmp_path / "state.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="normalization .*'upper_clip': 4.0"):
        load_checkpoint(tmp_path, config)


FIRST_WEIGHT = "encoders.0.0.weight"


def scripted_rounds(monkeypatch, dice_by_round: list[float]) -> list[tuple]:
    """Replace each round's federation by a scripted one: the model it starts from comes back
    shifted by the round number, with the next validation Dice of ``dice_by_round``. Returns
    what each round was given: (round, first parameter's first value, learning rate)."""
    import train.server_app as server_app

    given = []

    def play(grid, strategy, config, server_round, arrays, lr_drops_done=0):
        rate = site_config(config, lr_drops_done)["learning-rate"]
        given.append((server_round, float(arrays[FIRST_WEIGHT].flat[0]), rate))
        shifted = {
            k: v + np.float32(server_round) if v.dtype == np.float32 else v
            for k, v in arrays.items()
        }
        validation = {
            k: dice_by_round[server_round - 1] for k in ("dice", "cldice", "clre", "clpr")
        }
        return shifted, {
            "round": server_round,
            "train": {"sites": {}, "loss": 0.5, "learning_rate": rate},
            "validation": {"sites": {}, **validation},
            "seconds": 1.0,
        }

    monkeypatch.setattr(server_app, "play_round", play)
    return given


def test_a_plateau_with_a_drop_left_goes_on_from_the_best_model_at_a_tenth_of_the_rate(
    tmp_path, monkeypatch
):
    """Patience 2: rounds 3-4 bring nothing after round 2, so round 5 starts from round 2's
    model at a tenth of the learning rate; rounds 6-7 bring nothing after round 5, no drop is
    left, and round 5's model is exported. A run that stopped without drops (the paper's
    training) resumes the same way when it is given one."""
    dice = [0.5, 0.6, 0.55, 0.58, 0.7, 0.65, 0.66, 0.6, 0.6]
    given = scripted_rounds(monkeypatch, dice)
    config = tiny_config(tmp_path, patience=2, **{"num-rounds": 20, "learning-rate": 1e-3})
    state = run_training(None, config.replace(lr_drops=0))
    assert state.round == 4 and state.best_round == 2 and state.lr_drops_done == 0
    after_round = {r: start + r for r, start, _ in given}  # a round adds its number
    state = run_training(None, config.replace(lr_drops=1))
    assert [r for r, _, _ in given] == [1, 2, 3, 4, 5, 6, 7]
    assert [rate for _, _, rate in given] == pytest.approx([1e-3] * 4 + [1e-4] * 3)
    assert given[4][1] == pytest.approx(after_round[2])  # round 5 began from round 2's model
    assert (state.round, state.best_round, state.lr_drops_done) == (7, 5, 1)
    assert state.stop_reason == "no better validation Dice for 2 rounds after 1 learning-rate drops"
    assert [r["train"]["learning_rate"] for r in state.history][3:5] == pytest.approx([1e-3, 1e-4])
    entry = load_manifest(config.out_dir).provenance["folds"]["0"]
    assert (entry["best_round"], entry["lr_drops"]) == (5, 1)
    weights = Path(config.out_dir)
    exported = load_fold(weights, load_manifest(weights), 0).state_dict()[FIRST_WEIGHT]
    assert float(exported.flatten()[0]) == pytest.approx(given[4][1] + 5, rel=1e-3)


def test_a_resumed_run_refuses_a_site_whose_cases_changed_and_logs_other_changes(caplog):
    def record(round_, cases, fingerprint):
        scores = dict.fromkeys(("dice", "cldice", "clre", "clpr"), 0.5)
        sites = {"site1": {"cases": cases, "fingerprint": fingerprint}}
        validation = {"sites": {}, **scores}
        return {"round": round_, "train": {"sites": sites}, "validation": validation, "seconds": 1}

    state = RunState(config={})
    assert update_state(state, record(1, 4, "aaaa"))
    update_state(state, record(2, 4, "aaaa"))
    assert "differ" not in caplog.text
    update_state(state, record(3, 4, "bbbb"))
    assert "site1: dataset files differ from when this run started (fingerprint aaaa -> bbbb)" in (
        caplog.text
    )
    with pytest.raises(ValueError, match="site1: trains on 5 cases, this run started with 4"):
        update_state(state, record(4, 5, "cccc"))
    assert state.round == 3  # the refused round left the state as it was


def test_a_paused_run_is_compacted_to_fp16_and_resumes_in_fp32(tmp_path):
    config = tiny_config(tmp_path)
    arrays = initial_arrays(config)
    best = {k: v + 1 if v.dtype == np.float32 else v for k, v in arrays.items()}
    state = RunState(config=config.to_run_config(), round=5, best_round=4, best_dice=0.5)
    save_checkpoint(tmp_path, state, best, best)  # best round 4, then round 5's model
    save_checkpoint(tmp_path, state, arrays, None)
    files = compact(tmp_path)
    assert sorted(f.name for f in files) == [
        "best-r0004.safetensors",
        "global-r0005.safetensors",
        "state.json",
    ]
    assert not (tmp_path / PAUSE).exists()
    on_disk = safetensors_load((tmp_path / "global-r0005.safetensors").read_bytes())
    assert {v.dtype for v in on_disk.values()} >= {np.dtype(np.float16)}
    assert all(v.dtype != np.float32 for v in on_disk.values())
    loaded_state, loaded, loaded_best = load_checkpoint(tmp_path, config)
    assert loaded_state.round == 5 and loaded_state.best_round == 4
    for name, value in arrays.items():
        assert loaded[name].dtype == value.dtype
        assert np.allclose(loaded[name], value, rtol=1e-3, atol=1e-4)
        assert np.allclose(loaded_best[name], best[name], rtol=1e-3, atol=1e-4)
    assert any(not np.array_equal(loaded_best[k], loaded[k]) for k in arrays)


def test_one_process_trains_a_fold_and_a_pause_waits_for_its_round(tmp_path):
    rounds = []

    def training() -> None:  # what the ServerApp does: a round, then a look for a pause
        with training_lock(tmp_path):
            started.set()
            while True:
                rounds.append(len(rounds) + 1)
                time.sleep(0.02)
                if pause_requested(tmp_path):
                    return

    started = threading.Event()
    trainer = threading.Thread(target=training)
    trainer.start()
    started.wait()
    with (
        pytest.raises(ValueError, match="another process is training this fold"),
        training_lock(tmp_path),
    ):
        pass
    assert pause(tmp_path) is None  # returns once the round has ended
    trainer.join(timeout=10)  # it released the lock on its way out
    assert not trainer.is_alive() and rounds and not (tmp_path / PAUSE).exists()
    with training_lock(tmp_path):  # free again
        pass


def test_folds_exported_separately_build_one_manifest(tmp_path):
    out = tmp_path / "weights"
    for fold in (1, 0):
        config = tiny_config(tmp_path, fold=fold)
        export_fold(initial_arrays(config), config, out, {"fold": fold, "best_round": 3})
    manifest = load_manifest(out)
    assert [e.fold for e in manifest.folds] == [0, 1]
    assert set(manifest.provenance["folds"]) == {"0", "1"}
    assert manifest.patch_size == (32, 32, 32) and manifest.target_spacing == (0.227,) * 3
    net = load_fold(out, manifest, 1)
    assert net.architecture.base_channels == 4
    other = tiny_config(tmp_path, **{"base-channels": 8, "fold": 2})
    with pytest.raises(WeightError, match="architecture"):
        export_fold(initial_arrays(other), other, out, {})


def test_a_warm_start_begins_from_the_named_model(tmp_path):
    out = tmp_path / "weights"
    config = tiny_config(tmp_path, seed=3)
    export_fold(initial_arrays(config), config, out, {"fold": 0})
    shipped = out / load_manifest(out).folds[0].file
    warm = initial_arrays(tiny_config(tmp_path, **{"init-weights": str(shipped)}))
    seeded = initial_arrays(tiny_config(tmp_path))
    reference = initial_arrays(config)  # what was shipped, before its fp16 rounding
    name = "encoders.0.0.weight"
    assert warm[name].dtype == np.float32 and not np.array_equal(warm[name], seeded[name])
    assert np.allclose(warm[name], reference[name], rtol=1e-3, atol=1e-4)
    wider = tiny_config(tmp_path, **{"init-weights": str(shipped), "base-channels": 8})
    with pytest.raises(ValueError, match=r"fold_0\.safetensors: not this architecture"):
        initial_arrays(wider)
    with pytest.raises(ValueError, match=r"missing\.st: cannot be read"):
        initial_arrays(tiny_config(tmp_path, **{"init-weights": str(tmp_path / "missing.st")}))


# --- what leaves a site ----------------------------------------------------------------------


def test_a_site_sends_only_model_arrays_and_scalar_metrics(federation, tmp_path):
    from train.client_app import app

    config = tiny_config(tmp_path)
    reference = build_network(config).state_dict()
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(federation[0])},
        state=RecordDict(),
        run_config={},
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(reference),
            "config": ConfigRecord({**site_config(config), "server-round": 1}),
        }
    )
    names = list(list_cases(federation[0]))
    images = [
        sitk.GetArrayFromImage(sitk.ReadImage(str(i)))
        for i, _ in list_cases(federation[0]).values()
    ]
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        answer = app(message(content, 7, kind), context)
        assert not answer.has_error()
        records = answer.content
        assert set(records.metric_records) == {"metrics"}
        assert set(records.config_records) == {"site"}
        metrics = records["metrics"]
        assert all(isinstance(v, int | float) for v in metrics.values())
        assert metrics["num-examples"] == (2 if kind == MessageType.TRAIN else 1)
        site = dict(records["site"])
        assert set(site) == {"name", "dataset", "fingerprint"}
        assert not any(n in str(v) for n in names for v in site.values())
        if kind == MessageType.EVALUATE:
            assert not records.array_records and 0.0 <= metrics["dice"] <= 1.0
            continue
        arrays = records["arrays"]
        assert set(records.array_records) == {"arrays"}
        assert {k: tuple(v.shape) for k, v in arrays.items()} == {
            k: tuple(v.shape) for k, v in reference.items()
        }
        for value in arrays.values():  # kernels are at most 7^3: no volume hides in them
            assert max(value.numpy().shape[2:], default=0) <= 7
            assert tuple(value.numpy().shape[-3:]) != images[0].shape
            assert np.isfinite(value.numpy()).all()


def test_a_site_refuses_a_server_that_normalises_otherwise(federation, tmp_path):
    """A site or server on other software would train the model on inputs at another scale."""
    from train.client_app import app

    config = tiny_config(tmp_path)
    context = Context(1, 7, {"data-path": str(federation[0])}, RecordDict(), {})
    settings = {**site_config(config), "server-round": 1}
    assert json.loads(settings[NORMALIZATION_KEY]) == DEFAULT_NORMALIZATION
    older = json.dumps(LEGACY_NORMALIZATION)
    differing = (
        "upper_bound_factor 3.0 here, unset there; .*upper_percentile 99.99 here, 99.5 there"
    )
    for sent, reason in ((older, differing), (None, "sent no")):
        changed = {**settings, NORMALIZATION_KEY: sent}
        if sent is None:
            del changed[NORMALIZATION_KEY]
        content = RecordDict(
            {
                "arrays": ArrayRecord(build_network(config).state_dict()),
                "config": ConfigRecord(changed),
            }
        )
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):  # Flower replies with the error
            with pytest.raises(ValueError, match=reason):
                app(message(content, 7, kind), context)


# --- the simulated federation ---------------------------------------------------------------


def simulate_fold(federation: list[Path], tmp_path: Path, run: str, **changes) -> dict:
    from train.simulation import prepare_environment, simulate

    prepare_environment(tmp_path / "work")
    config = tiny_config(
        tmp_path,
        **{
            "sim-data-root": str(federation[0].parent),
            "num-rounds": 2,
            "wait-for-sites": 3,
            "run-dir": str(tmp_path / run),
            **changes,
        },
    )
    simulate(config, len(federation), cpus_per_site=1)
    return json.loads((tmp_path / run / "fold0" / "state.json").read_text())


def final_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    state = json.loads((run_dir / "fold0" / "state.json").read_text())
    return load_file(run_dir / "fold0" / state["global_file"])


def assert_all_sites_replied(record: dict) -> None:
    """Every site trained and validated in this round; the message names what went wrong."""
    for phase in ("train", "validation"):
        report = record[phase]
        assert sorted(report["sites"]) == ["site1", "site2", "site3"], (
            f"round {record['round']} {phase}: replies from {sorted(report['sites'])}, "
            f"failures {report['failures']}, left out {report.get('left_out')}"
        )
        assert report["failures"] == [] and not report.get("left_out"), report


def losses(record: dict) -> dict[str, float]:
    return {site: report["train-loss"] for site, report in record["train"]["sites"].items()}


def test_simulated_federation_trains_resumes_and_is_reproducible(federation, tmp_path, capsys):
    from train.__main__ import main

    settings = " ".join(f"{k}={v}" for k, v in {**TINY, "num-rounds": 2}.items())
    command = [
        "--data",
        str(federation[0].parent),
        "--work",
        str(tmp_path / "cli"),
        "--cpus-per-site",
        "1",
        "--run-config",
        settings,
    ]
    fold = tmp_path / "cli" / "train" / "fold0"
    fold.mkdir(parents=True)
    (fold / PAUSE).touch()  # paused after round 1: exit 75, nothing exported
    assert main(command) == PAUSED_EXIT
    assert "paused after round 1; the same command resumes" in capsys.readouterr().err
    assert not (fold / PAUSE).exists() and not (tmp_path / "cli" / "weights").exists()
    (fold / PAUSE).touch()  # asked during the last round: the run still finishes and exports
    assert main(command) == 0  # the same command resumes
    assert not (fold / PAUSE).exists()
    summary = json.loads(capsys.readouterr().out)
    assert summary["rounds"] == 2 and sorted(summary["sites"]) == ["site1", "site2", "site3"]
    resumed = json.loads((fold / "state.json").read_text())
    for record in resumed["history"]:
        assert_all_sites_replied(record)
        assert 0.0 <= record["validation"]["dice"] <= 1.0
    assert {s["training_cases"] for s in resumed["sites"].values()} == {2}
    weights = tmp_path / "cli" / "weights"
    manifest = load_manifest(weights)
    provenance = manifest.provenance["folds"]["0"]
    assert provenance["best_round"] == resumed["best_round"] and provenance["rounds"] == 2
    assert set(provenance["sites"]) == {"site1", "site2", "site3"}
    assert load_fold(weights, manifest, 0).architecture.base_channels == 4

    # The same seed without a pause computes the same rounds, bit for bit.
    whole = simulate_fold(federation, tmp_path, "whole")
    assert whole["stop_reason"] == "num-rounds reached"
    assert [losses(r) for r in resumed["history"]] == [losses(r) for r in whole["history"]]
    expected = final_arrays(tmp_path / "whole")
    actual = final_arrays(tmp_path / "cli" / "train")
    assert all(np.array_equal(expected[k], actual[k]) for k in expected)
