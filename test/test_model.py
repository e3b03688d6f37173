"""The network (shapes, gradients, variants) and the fold-weight format (round trip, errors)."""

import json
import pickle

import pytest
import torch

from inference.preprocessing import DEFAULT_NORMALIZATION
from model import (
    Architecture,
    Manifest,
    VesselUNet,
    WeightError,
    load_ensemble,
    load_manifest,
    parameter_count,
    probabilities,
    save_fold,
    write_manifest,
)

NARROW = Architecture(base_channels=4)


def narrow_net(seed: int = 0, **settings) -> VesselUNet:
    torch.manual_seed(seed)
    return VesselUNet(Architecture(**{**NARROW.to_dict(), **settings}))


def shipped_folder(tmp_path, nets, manifest_architecture=None):
    """Write ``nets`` as folds 0..n-1 with a manifest, as training exports them."""
    entries = [save_fold(net, tmp_path / f"fold_{i}.safetensors", i) for i, net in enumerate(nets)]
    manifest = Manifest(
        architecture=manifest_architecture or nets[0].architecture,
        patch_size=(32, 32, 32),
        target_spacing=(0.227, 0.227, 0.227),
        normalization=DEFAULT_NORMALIZATION,
        folds=entries,
        provenance={"data": "test"},
    )
    write_manifest(tmp_path, manifest)
    return manifest


def test_output_shape_and_probabilities_sum_to_one():
    net = narrow_net().eval()
    x = torch.randn(2, 1, 32, 48, 16)
    with torch.no_grad():
        logits = net(x)
    assert logits.shape == (2, 2, 32, 48, 16)
    p = probabilities(logits)
    assert torch.allclose(p.sum(dim=1), torch.ones(2, 32, 48, 16), atol=1e-6)
    assert (p >= 0).all() and (p <= 1).all()


@pytest.mark.parametrize("hsca,msfe", [(True, True), (True, False), (False, True)])
def test_every_parameter_receives_a_gradient(hsca, msfe):
    net = narrow_net(hsca=hsca, msfe=msfe).train()
    x = torch.randn(2, 1, 32, 32, 32)
    target = (torch.rand(2, 32, 32, 32) > 0.9).long()
    loss = torch.nn.functional.cross_entropy(net(x), target)
    loss.backward()
    grads = dict(net.named_parameters())
    assert [n for n, p in grads.items() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in grads.values())
    # A ReLU unit dead for this one batch may leave a tensor's gradient all zero; not most.
    silent = [n for n, p in grads.items() if not p.grad.abs().sum() > 0]
    assert len(silent) <= len(grads) // 20, silent


def test_the_three_variants_differ_in_parameter_count():
    counts = {
        (hsca, msfe): parameter_count(VesselUNet(hsca=hsca, msfe=msfe))
        for hsca, msfe in [(False, True), (True, False), (True, True)]
    }
    assert len(set(counts.values())) == 3
    # The full network as documented in model/network.py.
    assert 6.75e6 < counts[(True, True)] < 6.85e6
    transposed = parameter_count(VesselUNet(upsampling="transposed"))
    assert 7.0e6 < transposed < 7.2e6
    assert counts[(True, False)] < counts[(False, True)] < counts[(True, True)]


def test_the_modules_change_the_output():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    outputs = []
    for hsca, msfe in [(False, True), (True, False), (True, True)]:
        with torch.no_grad():
            outputs.append(narrow_net(hsca=hsca, msfe=msfe).eval()(x))
    assert not torch.allclose(outputs[0], outputs[2])
    assert not torch.allclose(outputs[1], outputs[2])


def test_trilinear_decoder_is_interpolation_then_projection():
    """The paper's decoder: trilinear 2x upsampling and a 1x1x1 conv, whose order (conv first,
    for speed) does not change the result."""
    torch.manual_seed(0)
    up = narrow_net().decoders[0].up
    conv, interpolate = up[0], up[1]
    x = torch.randn(1, conv.in_channels, 4, 6, 2)
    with torch.no_grad():
        assert torch.allclose(up(x), conv(interpolate(x)), atol=1e-5)
        assert up(x).shape == (1, conv.out_channels, 8, 12, 4)
        # Trilinear: a map that is linear along z stays linear in the interior.
        ramp = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, conv.in_channels, 4, 2, 2)
        z_profile = interpolate(ramp)[0, 0, 1:-1, 0, 0]
        assert torch.allclose(z_profile.diff(), torch.full((5,), 0.5))


def test_upsampling_switch_changes_the_layers_and_is_validated():
    trilinear, transposed = narrow_net(), narrow_net(upsampling="transposed")
    assert isinstance(transposed.decoders[0].up, torch.nn.ConvTranspose3d)
    assert set(trilinear.state_dict()) != set(transposed.state_dict())
    with pytest.raises(ValueError, match="upsampling 'nearest' is not one of"):
        Architecture(upsampling="nearest")


def test_format_1_manifests_load_with_transposed_decoders(tmp_path):
    """Weights saved before the switch (format 1, no ``upsampling``) keep loading."""
    shipped_folder(tmp_path, [narrow_net(upsampling="transposed")])
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == "vessel-unet-folds/2"
    assert data["architecture"]["upsampling"] == "transposed"
    del data["architecture"]["upsampling"]
    data["format"] = "vessel-unet-folds/1"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    manifest, (net,) = load_ensemble(tmp_path)
    assert manifest.architecture.upsampling == "transposed"
    assert isinstance(net.decoders[0].up, torch.nn.ConvTranspose3d)
    # The same file under a format-2 manifest without the key means trilinear: refused.
    data["format"] = "vessel-unet-folds/2"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(WeightError, match="wrong architecture"):
        load_ensemble(tmp_path)


def test_width_setting_narrows_the_network():
    assert parameter_count(narrow_net()) < parameter_count(VesselUNet()) / 10


@pytest.mark.parametrize("shape", [(30, 32, 32), (32, 32, 40), (8, 16, 16)])
def test_size_not_divisible_by_16_is_refused(shape):
    with pytest.raises(ValueError, match=r"\(" + ", ".join(map(str, shape)) + r"\).*divisible"):
        narrow_net()(torch.zeros(1, 1, *shape))


def test_round_trip_is_exact_in_fp16(tmp_path, monkeypatch):
    nets = [narrow_net(seed) for seed in (1, 2)]
    for net in nets:  # non-trivial batch-norm statistics must survive too
        net.train()(torch.randn(2, 1, 32, 32, 32))
    shipped_folder(tmp_path, nets)

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used in the weight path")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    manifest, loaded = load_ensemble(tmp_path)
    assert [e.fold for e in manifest.folds] == [0, 1]
    for original, restored in zip(nets, loaded):
        for name, tensor in original.state_dict().items():
            expected = tensor.half().float() if tensor.is_floating_point() else tensor
            assert torch.equal(restored.state_dict()[name], expected), name
        assert not restored.training
    assert load_manifest(tmp_path).to_dict() == manifest.to_dict()
    for file in tmp_path.iterdir():  # readable by the container's unprivileged user
        assert file.stat().st_mode & 0o044 == 0o044, file


def test_manifest_holds_what_inference_needs(tmp_path):
    shipped_folder(tmp_path, [narrow_net()])
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert {"architecture", "patch_size", "target_spacing", "normalization", "folds"} <= set(data)
    assert data["architecture"]["base_channels"] == 4
    entry = data["folds"][0]
    assert len(entry["sha256"]) == 64
    assert entry["bytes"] == (tmp_path / entry["file"]).stat().st_size
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_weights_beyond_fp16_range_are_refused_before_writing(tmp_path):
    net = narrow_net()
    with torch.no_grad():
        net.state_dict()["head.weight"].view(-1)[0] = 1e5  # fp16's largest value is 65504
    path = tmp_path / "fold_0.safetensors"
    with pytest.raises(WeightError, match=r"fold_0\.safetensors: tensor 'head\.weight' is not fin"):
        save_fold(net, path, 0)
    assert not path.exists()


def test_truncated_file_is_named(tmp_path):
    shipped_folder(tmp_path, [narrow_net()])
    path = tmp_path / "fold_0.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightError, match=r"fold_0\.safetensors: truncated, 1000 of \d+ bytes"):
        load_ensemble(tmp_path)


def test_bit_flip_is_detected(tmp_path):
    shipped_folder(tmp_path, [narrow_net()])
    path = tmp_path / "fold_0.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    message = r"fold_0\.safetensors: sha256 .* corrupted or was modified"
    with pytest.raises(WeightError, match=message):
        load_ensemble(tmp_path)


@pytest.mark.parametrize(
    "manifest_settings",
    [
        {"base_channels": 4, "msfe": False},
        {"base_channels": 8},
        {"base_channels": 4, "hsca": False},
        {"base_channels": 4, "upsampling": "transposed"},
    ],
)
def test_wrong_architecture_is_named(tmp_path, manifest_settings):
    shipped_folder(tmp_path, [narrow_net()], Architecture(**manifest_settings))
    with pytest.raises(WeightError, match=r"fold_0\.safetensors: wrong architecture"):
        load_ensemble(tmp_path)


def test_missing_and_broken_manifest(tmp_path):
    with pytest.raises(WeightError, match="manifest.json: manifest not found"):
        load_ensemble(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(WeightError, match="manifest.json: not valid JSON"):
        load_ensemble(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "vessel-unet-folds/2"}))
    with pytest.raises(WeightError, match="manifest.json: invalid manifest"):
        load_ensemble(tmp_path)


def test_missing_fold_is_named(tmp_path):
    shipped_folder(tmp_path, [narrow_net()])
    with pytest.raises(WeightError, match="no fold 3"):
        load_ensemble(tmp_path, folds=[3])
    (tmp_path / "fold_0.safetensors").unlink()
    with pytest.raises(WeightError, match=r"fold_0\.safetensors: weight file not found"):
        load_ensemble(tmp_path)
