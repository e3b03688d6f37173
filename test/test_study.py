"""The study's data: a federation, a flat held-out test set, pooled and single-site views."""

import json

from train import study


def test_study_data_views_link_the_federation_and_hold_out_other_seeds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the study writes under work/study of the current folder
    monkeypatch.setattr(study, "FEDERATION", {"cases": 2, "size": 32, "seed": 5, "sites": 3})
    monkeypatch.setattr(study, "TEST_SET", {"cases": 1, "size": 32, "seed": 6, "sites": 4})
    monkeypatch.setattr(study, "INDEPENDENT_SET", {"cases": 2, "size": 32, "seed": 7})
    study.make_data()
    data = tmp_path / study.DATA
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
    for family, folder in (("randomised", "federation"), ("reference", "federation-reference")):
        meta = json.loads((data / folder / "site1" / "dataset.json").read_text())
        assert meta["phantom"]["family"] == family
    independent = sorted(p.name for p in (data / "independent" / "input").iterdir())
    assert independent == ["case_000_0000.nii.gz", "case_001_0000.nii.gz"]
    test_meta = json.loads((data / "federation" / "site1" / "dataset.json").read_text())
    assert (
        test_meta["phantom"]["case_seeds"]
        == json.loads((data / "federation-reference" / "site1" / "dataset.json").read_text())[
            "phantom"
        ]["case_seeds"]
    )
    study.make_data()  # a second call keeps what is there
    assert sorted(p.name for p in (data / "test" / "input").iterdir()) == test_cases
