"""The study: its data views, the choice of cleaning on validation cases, and shipping."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import write_weights
from PIL import Image
from scipy import ndimage

from inference.preprocessing import DEFAULT_NORMALIZATION
from model.weights import load_manifest
from postprocess import CleaningSettings
from study import data as study_data
from study import postprocessing, tables
from study import runs as study_runs
from study.__main__ import main
from study.paths import StudyPaths
from study.runs import FOLDS
from train.checkpoint import RunState, write_state


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A study root with small federations and test sets, made from another directory."""
    root = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("elsewhere"))  # nothing depends on the cwd
        patch.setattr(study_data, "FEDERATION", {"cases": 2, "size": 32, "seed": 5, "sites": 3})
        patch.setattr(study_data, "TEST_SET", {"cases": 1, "size": 32, "seed": 6, "sites": 4})
        patch.setattr(study_data, "INDEPENDENT_SET", {"cases": 2, "size": 32, "seed": 7})
        study_data.make_data(StudyPaths.at(root))
    return StudyPaths.at(root)


def test_study_data_views_link_the_federation_and_hold_out_other_seeds(tiny_study):
    data = tiny_study.data
    pooled = sorted(p.name for p in (data / "pooled" / "pooled" / "imagesTr").iterdir())
    assert pooled == [f"site{k}_00{i}_0000.nii.gz" for k in (1, 2, 3) for i in (0, 1)]
    assert all(p.resolve().is_file() for p in (data / "pooled" / "pooled" / "labelsTr").iterdir())
    alone = data / "site2-alone" / "site2"
    assert alone.is_symlink() and alone.resolve() == (data / "federation" / "site2").resolve()
    test_cases = sorted(p.name for p in (data / "test" / "input").iterdir())
    assert test_cases == [f"site{k}_000_0000.nii.gz" for k in (1, 2, 3, 4)]
    assert len(list((data / "test" / "ground_truth").iterdir())) == 4
    # other seeds: no test volume equals a training volume of the same site
    for k in (1, 2, 3):
        name = f"site{k}_000_0000.nii.gz"
        trained = data / "federation" / f"site{k}" / "imagesTr" / name
        assert trained.read_bytes() != (data / "test" / "input" / name).read_bytes()
    # the pilot's two federations: the same sites and seeds, drawn by two generators
    seeds = []
    for family, folder in (("randomised", "federation"), ("reference", "federation-reference")):
        meta = json.loads((data / folder / "site1" / "dataset.json").read_text())
        assert meta["phantom"]["family"] == family
        seeds.append(meta["phantom"]["case_seeds"])
    assert seeds[0] == seeds[1]
    independent = sorted(p.name for p in (data / "independent" / "input").iterdir())
    assert independent == ["case_000_0000.nii.gz", "case_001_0000.nii.gz"]
    # the same cases with a coil pack: a bright ball added, every other voxel kept, same labels
    coil = data / "independent-coil"
    assert sorted(p.name for p in (coil / "input").iterdir()) == independent
    assert (coil / "ground_truth").resolve() == (data / "independent" / "ground_truth").resolve()
    for name in independent:
        plain, coiled = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(d / "input" / name))).astype(np.float32)
            for d in (data / "independent", coil)
        )
        added = coiled - plain
        assert 3 * plain.max() < coiled.max() <= 32767
        assert 0.004 < np.mean(added > plain.max()) < 0.03  # a ball of radius 4 in 32^3
        assert np.mean(added == 0) > 0.9 and added.min() >= 0
    # Table 4: the same images, only the partially labelled site's labels differ
    site = study_data.PARTIAL_SITE
    for view, ignore in (("major", True), ("major-naive", False), ("sparse", True)):
        folder = data / f"federation-{view}"
        labels = json.loads((folder / site / "dataset.json").read_text())["labels"]
        assert ("ignore" in labels) == ignore, view
        assert "ignore" not in json.loads((folder / "site1" / "dataset.json").read_text())["labels"]
        name = f"{site}/imagesTr/{site}_000_0000.nii.gz"
        assert (folder / name).read_bytes() == (data / "federation" / name).read_bytes()
    without = sorted(p.name for p in (data / f"federation-without-{site}").iterdir())
    assert without == ["site1", "site2"]
    (data / "pooled" / "pooled" / "imagesTr" / pooled[0]).unlink()
    study_data.make_data(tiny_study)  # a second call keeps what is there, mends what is not
    assert sorted(p.name for p in (data / "pooled" / "pooled" / "imagesTr").iterdir()) == pooled
    assert sorted(p.name for p in (data / "test" / "input").iterdir()) == test_cases


def test_cleaning_never_trades_a_true_branch_for_dice():
    """A candidate that gains Dice by dropping true components (lower clRe) loses to a
    gentler one; among candidates that keep the topology, Dice decides."""
    none, gentle, greedy = postprocessing.CANDIDATES[0], *postprocessing.CANDIDATES[6:8]
    scores = {
        none: {"Dice": 0.80, "clRe": 0.950},
        gentle: {"Dice": 0.82, "clRe": 0.9495},
        greedy: {"Dice": 0.85, "clRe": 0.930},
    }
    assert postprocessing.choose(scores) == gentle
    scores[gentle]["clRe"] = 0.94
    assert postprocessing.choose(scores) == none  # nothing else keeps the branches


def test_postprocess_writes_its_own_file_and_ship_is_a_separate_step(
    tiny_study, tmp_path, monkeypatch
):
    candidates = postprocessing.CANDIDATES[:2] + postprocessing.CANDIDATES[-3:]
    monkeypatch.setattr(postprocessing, "CANDIDATES", candidates)  # a few, to stay quick
    weights = tiny_study.weights(FOLDS)
    write_weights(weights, folds=2, target_spacing=(0.227,) * 3, postprocess={})
    before = (weights / "manifest.json").read_bytes()
    main(["--root", str(tiny_study.root), "postprocess", "fold0"])
    assert (weights / "manifest.json").read_bytes() == before  # choosing writes no manifest
    record = json.loads(postprocessing.choice_file(tiny_study, "fold0").read_text())
    assert record["validation_cases"] == 6  # each fold predicts only its own validation cases
    assert len(record["candidates"]) == len(postprocessing.CANDIDATES)
    chosen = CleaningSettings.from_dict(record["postprocess"])
    assert chosen == postprocessing.load(tiny_study, "fold0")

    destination = tmp_path / "shipped"
    destination.mkdir()
    (destination / "fold_7.safetensors").write_bytes(b"a fold of an older set")
    main(["--root", str(tiny_study.root), "ship", "fold0", "--to", str(destination)])
    shipped = load_manifest(destination)
    assert CleaningSettings.from_dict(shipped.postprocess) == chosen
    assert shipped.provenance["postprocess"]["rule"] == record["rule"]
    assert sorted(p.name for p in destination.glob("fold_*")) == [
        "fold_0.safetensors",
        "fold_1.safetensors",
    ]


def test_ship_refuses_a_run_without_a_chosen_cleaning(tiny_study, tmp_path):
    write_weights(tiny_study.weights("pooled"), folds=1, target_spacing=(0.227,) * 3)
    with pytest.raises(FileNotFoundError, match="python -m study postprocess pooled"):
        main(["--root", str(tiny_study.root), "ship", "pooled", "--to", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_learning_rate_table_compares_the_rounds_both_pilots_ran(tmp_path):
    paths = StudyPaths.at(tmp_path)
    curves = {"pilot-randomised": [0.2, 0.5, 0.4, 0.6, 0.7], "pilot-randomised-lr1e-4": [0.1, 0.3]}
    for run, curve in curves.items():
        folder = paths.runs / run / "train" / "fold0"
        folder.mkdir(parents=True)
        history = [{"round": r + 1, "validation": {"dice": d}} for r, d in enumerate(curve)]
        write_state(folder, RunState({}, history=history))
    text = tables.learning_rates(paths)
    assert "| 0.001 | 0.200 | 0.500 | 0.500 | 0.350 |" in text  # rounds 1-2, best, mean
    assert "| 0.0001 | 0.100 | 0.300 | 0.300 | 0.200 |" in text
    assert (paths.results / "learning-rate.md").read_text() == text


def test_worst_case_picture_shows_the_case_the_first_masks_segment_worst(tiny_study, tmp_path):
    data = tiny_study.data / "independent"
    truths = sorted((data / "ground_truth").glob("*.nii.gz"))
    ranked, other = tmp_path / "ranked", tmp_path / "other"
    for folder in (ranked, other):
        folder.mkdir()
    for number, truth in enumerate(truths):
        image = sitk.ReadImage(str(truth))
        sitk.WriteImage(image, str(other / truth.name))
        if number == 1:  # the ranked masks lose half of this case's vessel voxels
            array = sitk.GetArrayFromImage(image)
            array[: array.shape[0] // 2] = 0
            image = sitk.GetImageFromArray(array)
            image.CopyInformation(sitk.ReadImage(str(truth)))
        sitk.WriteImage(image, str(ranked / truth.name))
    picture = tmp_path / "worst.png"
    worst = tables.draw_worst_case(data, {"ranked": ranked, "other": other}, picture)
    assert worst == truths[1].name.removesuffix(".nii.gz")
    again = tables.draw_worst_case(data, {"other": other, "ranked": ranked}, picture, "ranked")
    assert again == worst
    single = tmp_path / "single.png"
    tables.draw_worst_case(data, {"other": other}, single)
    heights = [Image.open(p).height for p in (single, picture)]
    assert heights[1] == pytest.approx(heights[0] * 3 / 2, abs=8)  # truth + two mask rows
    rgb = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    blue = rgb[..., 2] - rgb[..., 0] > 60  # missed voxels, drawn against the truth
    assert blue[heights[0] :].any()  # the last row, the ranked masks, lost half a case
    assert not blue[: heights[0]].any()  # the truth and the other masks, which equal it


def test_park_pauses_a_run_and_prints_its_fp16_checkpoint_to_commit(tmp_path, capsys):
    from safetensors.numpy import load_file

    from train.checkpoint import RunState, save_checkpoint
    from train.config import TrainConfig
    from train.server_app import initial_arrays

    for fold in (0, 1):  # fold 0 finished (exported), fold 1 under way
        config = TrainConfig.from_run_config({"base-channels": 4, "fold": fold})
        folder = tmp_path / "runs" / "folds" / "train" / f"fold{fold}"
        folder.mkdir(parents=True)
        arrays = initial_arrays(config)
        state = RunState(config=config.to_run_config(), round=7, best_round=7, best_dice=0.4)
        save_checkpoint(folder, state, arrays, arrays)
    write_weights(tmp_path / "runs" / "folds" / "weights", folds=1, fitted=False)
    assert main(["--root", str(tmp_path), "park"]) == 0  # every unfinished run: fold 1 only
    printed = capsys.readouterr().out.split()
    assert printed == [
        str(folder / "state.json"),
        str(folder / "best-r0007.safetensors"),
        str(folder / "global-r0007.safetensors"),
    ]
    for name in printed[1:]:
        assert {str(v.dtype) for v in load_file(name).values()} <= {"float16", "int64"}
    with pytest.raises(ValueError, match="no checkpoint"):
        main(["--root", str(tmp_path), "park", "fold2"])


def test_progress_tells_each_run_apart_from_its_state_and_lock(tmp_path, capsys):
    # A study spans sessions: which runs are done, which one trains now, which one waits.
    from train.checkpoint import PAUSED, training_lock

    paths = StudyPaths.at(tmp_path)
    write_weights(paths.weights(FOLDS), folds=1, fitted=False)  # fold 0 exported
    seconds = {0: [500.0] * 2 + [300.0] * 10, 1: [400.0, 200.0, 300.0], 2: [360.0]}
    for fold, rounds in seconds.items():
        folder = study_runs.checkpoint_folder(paths, f"fold{fold}")
        folder.mkdir(parents=True)
        state = RunState(config={}, round=len(rounds), best_round=1, best_dice=0.5)
        state.best_metrics = {"dice": 0.5, "cldice": 0.6, "clre": 0.7}
        state.history = [{"round": r + 1, "seconds": s} for r, s in enumerate(rounds)]
        state.training_seconds = sum(rounds)
        state.stop_reason = PAUSED if fold == 1 else ""
        write_state(folder, state)
    with training_lock(study_runs.checkpoint_folder(paths, "fold2")):
        assert main(["--root", str(tmp_path), "progress"]) == 0
    rows = {
        line.split(" | ")[0][2:]: line.split(" | ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ")
    }
    assert rows["fold0"][1:3] == ["done", "12"] and rows["fold0"][9] == "300 |"
    assert rows["fold1"][1:3] == ["paused", "3"] and rows["fold1"][9] == "300 |"
    assert rows["fold2"][1] == "training" and rows["fold2"][4:7] == ["0.500", "0.600", "0.700"]
    assert rows["fold3"][1:3] == ["not started", "0"]
    assert "pilot-reference" not in rows  # the pilots only with --pilots
    assert main(["--root", str(tmp_path), "progress"]) == 0
    out = capsys.readouterr().out
    assert "| fold2 | interrupted |" in out  # no process, no pause: train resumes it
    assert "1 of 16 runs done; 1.5 h of training so far" in out  # 4000 + 900 + 360 s


def test_a_run_whose_fold_is_exported_is_not_trained_again(tmp_path, capsys):
    # A fresh clone holds a finished fold's weights, not its checkpoints: training it again
    # would cost hours and replace the committed fold.
    write_weights(tmp_path / "runs" / "folds" / "weights", folds=2, fitted=False)
    assert main(["--root", str(tmp_path), "train", "fold1"]) == 0
    assert "fold1 is trained (fold 1 in" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "folds" / "train").exists()


def stopped_fold(tmp_path, monkeypatch, name, settings, **fields):
    """A study whose fold ``name`` is exported and whose checkpoint (width 4, ``settings``)
    stopped as ``fields`` say; ``python -m train`` calls are recorded, not run."""
    from train.checkpoint import save_checkpoint
    from train.config import TrainConfig
    from train.server_app import initial_arrays

    calls = []
    monkeypatch.setattr(study_runs, "python", lambda *args: calls.append(args))
    paths = StudyPaths.at(tmp_path)
    write_weights(paths.weights(FOLDS), folds=study_runs.RUNS[name].fold + 1, fitted=False)
    folder = study_runs.checkpoint_folder(paths, name)
    folder.mkdir(parents=True)
    config = TrainConfig.from_run_config({"base-channels": 4, **settings})
    state = RunState(config=config.to_run_config(), **fields)
    arrays = initial_arrays(config)
    save_checkpoint(folder, state, arrays, arrays)
    return paths, calls, folder, state


def test_a_fold_stopped_before_its_learning_rate_drop_trains_further(tmp_path, monkeypatch):
    # Fold 0 stopped at its first plateau before the study had lr-drops: with its checkpoint
    # here it goes on (and park would pause it); without it (a fresh clone) it stays trained.
    paths, calls, folder, state = stopped_fold(
        tmp_path,
        monkeypatch,
        "fold0",
        {"patience": 10},
        round=28,
        best_round=18,
        best_dice=0.66,
        rounds_without_improvement=10,
        stop_reason="no better validation Dice for 10 rounds",
    )
    assert study_runs.unfinished(paths) == ["fold0"]
    assert main(["--root", str(tmp_path), "train", "fold0"]) == 0
    assert len(calls) == 1 and "lr-drops=1" in calls[0][-1]
    state.lr_drops_done = 1  # the drop taken: trained
    write_state(folder, state)
    assert study_runs.unfinished(paths) == []
    assert main(["--root", str(tmp_path), "train", "fold0"]) == 0 and len(calls) == 1
    state.lr_drops_done = 0
    write_state(folder, state)
    (folder / state.best_file).unlink()  # a fresh clone: only state.json is committed
    assert main(["--root", str(tmp_path), "train", "fold0"]) == 0 and len(calls) == 1


def test_a_fold_that_reached_a_smaller_round_cap_trains_further(tmp_path, monkeypatch):
    # Fold 1 still gained at 1e-4 when the 100-round cap ended it: under the larger cap it
    # resumes from its checkpoint; once it reaches the new cap (or has no checkpoint) it is done.
    paths, calls, folder, state = stopped_fold(
        tmp_path,
        monkeypatch,
        "fold1",
        {"num-rounds": 100},
        round=100,
        best_round=96,
        best_dice=0.86,
        rounds_without_improvement=4,
        lr_drops_done=1,
        stop_reason="num-rounds reached",
    )
    assert study_runs.unfinished(paths) == ["fold1"]
    assert main(["--root", str(tmp_path), "train", "fold1"]) == 0
    assert len(calls) == 1 and f"num-rounds={study_runs.MAX_ROUNDS}" in calls[0][-1]
    state.round = state.config["num-rounds"] = study_runs.MAX_ROUNDS  # the new cap reached
    write_state(folder, state)
    assert study_runs.unfinished(paths) == []
    state.round = state.config["num-rounds"] = 100
    write_state(folder, state)
    (folder / state.global_file).unlink()  # a fresh clone: only state.json is committed
    assert main(["--root", str(tmp_path), "train", "fold1"]) == 0 and len(calls) == 1


def test_data_of_an_older_generator_version_stops_the_study(tmp_path):
    paths = StudyPaths.at(tmp_path)
    site = paths.data / "federation" / "site1"
    site.mkdir(parents=True)
    (site / "dataset.json").write_text(json.dumps({"phantom": {"family": "randomised"}}))
    with pytest.raises(SystemExit, match="randomised phantoms of version 1, .* version 2"):
        study_data.make_data(paths)


def test_the_study_hands_its_engine_options_to_python_m_train(tmp_path, monkeypatch):
    # bench/gpu_study.sh trains every fold at once through the deployment engine (no Ray).
    calls = []
    monkeypatch.setattr(study_runs, "python", lambda *args: calls.append(args))
    root = ["--root", str(tmp_path)]
    main([*root, "--engine", "deployment", "--site-gpus", "0", "train", "fold3"])
    main([*root, "train", "fold3"])
    deployment, default = calls
    assert deployment[:6] == ("-m", "train", "--engine", "deployment", "--site-gpus", "0")
    assert deployment[6:] == default[2:]  # the same run otherwise
    assert "--engine" not in default and default[default.index("--fold") + 1] == "3"


def test_restore_adds_what_is_missing_and_keeps_what_trained_further(tmp_path, capsys):
    # A return from bench/gpu_study.sh: folds 0 and 1 exported, checkpoints of folds 2 (round 3),
    # 3 (round 4) and 4 (round 2, its global file not returned yet). Here: fold 0 exported,
    # fold 2 at round 5.
    import tarfile

    from train.checkpoint import RunState, save_checkpoint, training_lock
    from train.config import TrainConfig
    from train.server_app import initial_arrays

    def checkpoint(root, fold, rounds):
        config = TrainConfig.from_run_config({"base-channels": 4, "fold": fold})
        folder = root / "runs" / "folds" / "train" / f"fold{fold}"
        folder.mkdir(parents=True)
        state = RunState(config=config.to_run_config(), round=rounds, best_round=1, best_dice=0.4)
        save_checkpoint(folder, state, initial_arrays(config), initial_arrays(config))
        return folder

    device, here, returned = tmp_path / "device", tmp_path / "here", tmp_path / "returned"
    write_weights(device / "runs/folds/weights", folds=2, fitted=False, seed=1)
    shipped = write_weights(here / "runs/folds/weights", folds=1, fitted=False, seed=2)
    for fold, rounds in ((2, 3), (3, 4), (4, 2)):
        checkpoint(device, fold, rounds)
    mine = checkpoint(here, 2, 5)
    returned.mkdir()
    runs = device / "runs"
    with tarfile.open(returned / "study.tar.gz", "w:gz") as archive:
        for path in [*runs.rglob("state.json"), *runs.rglob("manifest.json")]:
            archive.add(path, arcname=str(path.relative_to(device)))
    for path in runs.rglob("*.safetensors"):
        if path.name != "global-r0002.safetensors":  # fold 4's: the next call's
            (returned / "--".join(path.relative_to(runs).parts)).write_bytes(path.read_bytes())

    behind = checkpoint(here, 3, 1)
    with training_lock(behind), pytest.raises(ValueError, match="another process is training"):
        main(["--root", str(here), "restore", str(returned)])  # fold 3 trains here
    assert main(["--root", str(here), "restore", str(returned)]) == 0  # once it has stopped
    report = capsys.readouterr().out
    manifest = load_manifest(here / "runs/folds/weights")
    assert [entry.fold for entry in manifest.folds] == [0, 1]
    assert manifest.folds[0] == shipped.folds[0]  # this study's fold 0 stays
    assert (here / "runs/folds/train/fold2/state.json").read_text() == (
        mine / "state.json"
    ).read_text()  # round 5 here beats the return's round 3
    assert json.loads((here / "runs/folds/train/fold3/state.json").read_text())["round"] == 4
    assert not (here / "runs/folds/train/fold4").exists()
    assert "fold4: not yet (global-r0002.safetensors not returned yet" in report


def test_levels_show_where_each_normalisation_puts_vessels_brighter_than_bone(tmp_path):
    """A tube brighter than everything, 3 % of the volume, written as NIfTI: at the 99.5th
    percentile its core is clipped flat at 1; the default anchor clips none of it. The command
    prints a row per normalisation and set."""
    from study import levels

    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[:40, :40, :40]
    tube = (((y - 20.0) ** 2 + (x - 20.0) ** 2) <= 16).astype(np.float32)
    image = 100 + 300 * ndimage.gaussian_filter(tube, 0.8) + rng.normal(0, 3, tube.shape)
    for part, array in (("input", image.astype(np.int16)), ("ground_truth", tube.astype(np.uint8))):
        (tmp_path / part).mkdir()
        name = "case_0000.nii.gz" if part == "input" else "case.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / part / name))
    legacy, default = (v[0] for v in levels.set_levels(tmp_path, levels.NORMALIZATIONS).values())
    core, rim, thin, clipped, binds = range(5)
    assert legacy[clipped] > 0.15 and legacy[core] > 0.99
    assert default[clipped] == 0 and 0.7 < default[core] < 1.0
    assert 0 < default[rim] < default[core] / 2
    assert np.isnan(default[thin])  # no vessel thinner than 1.5 voxels
    assert legacy[binds] == default[binds] == 0
    coil = sitk.ReadImage(str(tmp_path / "input" / "case_0000.nii.gz"))
    voxels = sitk.GetArrayFromImage(coil)
    voxels[2:8, 2:8, 2:8] = 30000  # a coil pack, 0.3 % of the volume
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(tmp_path / "input" / "case_0000.nii.gz"))
    assert levels.set_levels(tmp_path, {"default": DEFAULT_NORMALIZATION})["default"][0][binds] == 1
    table = levels.levels({"tube": tmp_path})
    assert table.count("| tube |") == 2 and "99.5th percentile, clipped at 1" in table
