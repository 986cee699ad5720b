"""Architectures, registry and loading of torchvision-format weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from models import MODELS, build_model, lenet5, load_init_weights, vgg16, vgg16_bn


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64])
def test_lenet5_shapes(channels: int, size: int) -> None:
    model = build_model("lenet5", 7, channels, size)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_vgg16_shapes(name: str) -> None:
    model = build_model(name, 5, 3, 32).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == name.endswith("_bn")


def test_too_small_images_are_refused() -> None:
    lenet5(10, 1, 16)  # the smallest size with a 1×1 feature map
    with pytest.raises(ValueError, match="image_size >= 16, got 15"):
        lenet5(10, 1, 15)
    with pytest.raises(ValueError, match="image_size >= 32.*got 31"):
        vgg16(10, 3, 31)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet' \(known: lenet5, vgg16, vgg16_bn\)"):
        build_model("resnet", 10, 3, 32)


def test_no_inplace_activations() -> None:
    # Saliency reads every activation after the forward pass; an in-place ReLU would overwrite them.
    for name in MODELS:
        with torch.device("meta"):  # structure only: skips allocating and initialising the weights
            model = build_model(name, 10, 3, 32)
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        assert all(not m.inplace for m in relus), name


@pytest.mark.parametrize(
    "ours, theirs", [(vgg16, torchvision.models.vgg16), (vgg16_bn, torchvision.models.vgg16_bn)]
)
def test_vgg_state_dict_matches_torchvision(ours, theirs) -> None:
    with torch.device("meta"):
        mine = {k: v.shape for k, v in ours(1000, 3, 224).state_dict().items()}
        ref = {k: v.shape for k, v in theirs(weights=None).state_dict().items()}
    assert mine == ref


@pytest.fixture(scope="module")
def torchvision_vgg16(tmp_path_factory) -> tuple[dict[str, torch.Tensor], str]:
    state = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp("init") / "vgg16.pth"
    torch.save(state, path)
    return state, str(path)


def test_load_torchvision_vgg16_into_grey_10_class(torchvision_vgg16) -> None:
    source, path = torchvision_vgg16
    model = vgg16(10, 1, 32)
    head_before = model.classifier[6].weight.clone()
    adapted = load_init_weights(model, path, in_channels=1)

    assert len(adapted) == 2 and "features.0.weight" in adapted[0] and "classifier.6" in adapted[1]
    state = model.state_dict()
    assert torch.equal(state["features.0.weight"], source["features.0.weight"].sum(dim=1, keepdim=True))
    for key, value in source.items():
        if key != "features.0.weight" and not key.startswith("classifier.6."):
            assert torch.equal(state[key], value), key
    assert torch.equal(model.classifier[6].weight, head_before)  # the new head stays as initialised


def test_load_torchvision_vgg16_unchanged(torchvision_vgg16) -> None:
    source, path = torchvision_vgg16
    model = vgg16(1000, 3, 224)
    assert load_init_weights(model, path, in_channels=3) == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())


def test_load_checkpoint_dict_and_errors(tmp_path) -> None:
    trained = lenet5(10, 1, 32)
    torch.save({"model": trained.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    model = lenet5(4, 1, 32)
    assert load_init_weights(model, tmp_path / "ckpt.pt", in_channels=1) == [
        "classifier.4: new 4-class head (checkpoint: 10)"
    ]
    assert torch.equal(model.features[3].weight, trained.features[3].weight)

    with pytest.raises(ValueError, match="classifier.0.weight"):  # flatten size differs at 64 px
        load_init_weights(lenet5(10, 1, 64), tmp_path / "ckpt.pt", in_channels=1)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_init_weights(model, tmp_path / "nowhere.pt", in_channels=1)
