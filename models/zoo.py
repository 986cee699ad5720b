"""The model zoo (name → constructor) and loading of torchvision-format initial weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.lenet5 import lenet5
from models.vgg16 import vgg16, vgg16_bn

# Every constructor takes (num_classes, in_channels, image_size).
MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "lenet5": lenet5,
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
}


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build a registered model.

    Args:
        name: a key of :data:`MODELS`.
        num_classes: number of output logits.
        in_channels: image channels (1 or 3).
        image_size: square input side the model is trained at.

    Returns:
        The freshly initialised model.

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones) or an unusable size.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name](num_classes, in_channels, image_size)


def _names(model: nn.Module, kind: type[nn.Module]) -> list[str]:
    """Qualified names of the submodules of type ``kind``, in registration (= forward) order."""
    found = [n for n, m in model.named_modules() if isinstance(m, kind)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no {kind.__name__}")
    return found


def load_init_weights(model: nn.Module, path: str | Path, in_channels: int) -> list[str]:
    """Load a torchvision-format state_dict (e.g. ImageNet VGG16) as the starting point.

    Two adaptations are made, everything else must match exactly:

    * an RGB first conv loaded into a 1-channel model is summed over its input channels
      (a grey image x behaves like the RGB image (x, x, x));
    * the last Linear (the class head) is skipped when its shape differs: it stays freshly
      initialised for our classes.

    Args:
        model: the model to fill, built for our classes and channels.
        path: local file saved with ``torch.save(state_dict)``; a dict with a ``"model"`` key
            (a training checkpoint) is accepted too.
        in_channels: channels of our images (1 or 3).

    Returns:
        One human-readable line per adaptation made (empty if none).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a non-head weight is missing, unexpected or of the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    state = dict(state)
    adapted = _adapt_first_conv(model, state, in_channels)
    own = model.state_dict()
    head_keys, head_note = _drop_new_head(model, state, own)
    adapted += head_note
    _check_fit(model, path, state, own, head_keys)
    model.load_state_dict(state, strict=False)
    return adapted


def _adapt_first_conv(model: nn.Module, state: dict[str, torch.Tensor], in_channels: int) -> list[str]:
    """An RGB first conv for a 1-channel model: summed over its input channels, in ``state``."""
    key = f"{_names(model, nn.Conv2d)[0]}.weight"
    if key in state and state[key].shape[1] == 3 and in_channels == 1:
        state[key] = state[key].sum(dim=1, keepdim=True)
        return [f"{key}: summed 3 input channels into 1"]
    return []


def _drop_new_head(model: nn.Module, state: dict[str, torch.Tensor],
                   own: dict[str, torch.Tensor]) -> tuple[set[str], list[str]]:
    """Drop the last Linear from ``state`` when its shape differs (another number of classes).

    Returns:
        The head's keys (allowed to be missing) and the note saying so; empty when the head loads.
    """
    head_name = _names(model, nn.Linear)[-1]
    hw = f"{head_name}.weight"
    if hw not in state or state[hw].shape == own[hw].shape:
        return set(), []  # the head is loaded like everything else, so it must be there
    note = f"{head_name}: new {own[hw].shape[0]}-class head (checkpoint: {state[hw].shape[0]})"
    head_keys = {hw, f"{head_name}.bias"}
    for k in head_keys:
        state.pop(k, None)
    return head_keys, [note]


def _check_fit(model: nn.Module, path: Path, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
               head_keys: set[str]) -> None:
    """Every weight but the head's present, none unexpected, every shape equal."""
    missing = sorted(set(own) - set(state) - head_keys)
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(state) & set(own)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}"
        )
