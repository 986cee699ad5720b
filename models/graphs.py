"""Export graphs around a trained network: uint8 image in, normalisation inside.

No caller of an exported model can get the preprocessing constants wrong, because they are part
of the graph. :class:`ClassifierGraph` is ``classifier.onnx``; :class:`models.saliency.SaliencyGraph`
builds on :class:`Normalize` too.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """uint8 image (N, C, H, W) → float ``(x / 255 - mean) / std`` per channel.

    Args:
        mean: per-channel mean, 0–1 scale (one value per image channel).
        std: per-channel standard deviation, 0–1 scale.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {list(mean)} vs {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # The buffers' dtype, not float32: a float64 copy of a graph then computes in float64 throughout.
        return (image.to(self.mean.dtype) / 255 - self.mean) / self.std


# Widest embedding ``classifier.onnx`` emits: LeNet-5's 84 penultimate features pass as they are,
# VGG16's 4,096 go through a fixed random projection. 128 float32 per logged prediction keeps the
# prediction log small, and distances survive a Gaussian projection (Johnson–Lindenstrauss).
EMBEDDING_MAX_DIMS = 128
PROJECTION_SEED = 0


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the last Linear: ``classifier[:-1]`` after features → avgpool → flatten, (N, D).

    Every network in :mod:`models` has that layout (as torchvision's VGG); in eval mode Dropout is
    the identity, so this is what the last layer sees.
    """
    return model.classifier[:-1](torch.flatten(model.avgpool(model.features(x)), 1))


def embedding_projection(width: int, dims: int = EMBEDDING_MAX_DIMS) -> torch.Tensor | None:
    """The fixed (width, dims) Gaussian projection for features wider than ``dims``, else None.

    Seeded, so it depends on the width only: an export needs no data to build it, and the
    reference stored beside the model was computed through the same matrix.
    """
    if width <= dims:
        return None
    generator = torch.Generator().manual_seed(PROJECTION_SEED)
    return torch.randn(width, dims, generator=generator) / dims**0.5


class ClassifierGraph(nn.Module):
    """``classifier.onnx``: uint8 image → (logits (N, K), softmax probabilities (N, K), embedding (N, E)).

    The embedding is the penultimate features (:func:`penultimate`), projected to
    :data:`EMBEDDING_MAX_DIMS` when wider: what the monitoring compares with the training data
    (drift, out-of-distribution score), from the same forward pass as the prediction.
    Puts ``model`` in eval mode and freezes its parameters.

    Args:
        model: a network from :mod:`models` (``features``, ``avgpool``, ``classifier`` Sequential).
        mean: per-channel mean of the training images, 0–1 scale.
        std: per-channel standard deviation, 0–1 scale.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if not isinstance(getattr(model, "classifier", None), nn.Sequential) or not isinstance(
                model.classifier[-1], nn.Linear):
            raise ValueError(f"{type(model).__name__}: ClassifierGraph needs a model whose `classifier` is an "
                             "nn.Sequential ending in nn.Linear (the embedding is that Linear's input)")
        self.normalize = Normalize(mean, std)
        self.model = model.eval().requires_grad_(False)
        projection = embedding_projection(model.classifier[-1].in_features)
        if projection is not None:
            projection = projection.to(model.classifier[-1].weight.dtype)
        self.register_buffer("projection", projection)
        self.train(False)

    def train(self, mode: bool = True) -> ClassifierGraph:
        return super().train(False)  # an export graph is always in inference mode

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = penultimate(self.model, self.normalize(image))
        logits = self.model.classifier[-1](features)
        embedding = features if self.projection is None else features @ self.projection
        return logits, logits.softmax(dim=1), embedding


def fold_adaptive_pool(model: nn.Module, image_size: int) -> nn.Module:
    """A copy of ``model`` for a fixed ``image_size`` with its adaptive average pool folded into
    the first Linear, when that makes the Linear smaller; else ``model`` itself.

    VGG pools its 512×h×w features to 7×7 before a 25088×4096 Linear (400 MB in float32). Below
    224 px, h×w < 7×7 and the pool only replicates pixels, so pool → flatten → Linear equals one
    Linear on the h×w features with weight ``W·(I ⊗ P)`` (P the pool as a 49×hw matrix): at 64 px
    8 MB instead of 400 MB, which is most of a batch-1 forward (and of saliency's backward).
    Exact up to float rounding; the training code keeps the unfolded model.
    """
    avgpool, classifier = getattr(model, "avgpool", None), getattr(model, "classifier", None)
    if not isinstance(avgpool, nn.AdaptiveAvgPool2d) or not isinstance(classifier, nn.Sequential):
        return model
    fc = classifier[0]
    first = next(m for m in model.features if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        probe = torch.zeros(1, first.in_channels, image_size, image_size, dtype=first.weight.dtype,
                            device=first.weight.device)
        training = model.features.training  # eval for the probe (BatchNorm), then as it was
        channels, h, w = model.features.eval()(probe).shape[1:]
        model.features.train(training)
        basis = torch.eye(h * w, dtype=probe.dtype, device=probe.device).view(h * w, 1, h, w)
        pool = avgpool(basis).flatten(1).T  # (Ho*Wo, h*w)
        pooled, kept = pool.shape
        if not isinstance(fc, nn.Linear) or pooled <= kept or fc.in_features != channels * pooled:
            return model
        folded = copy.deepcopy(model)
        weight = fc.weight.view(fc.out_features, channels, pooled) @ pool
        linear = nn.Linear(channels * h * w, fc.out_features, bias=fc.bias is not None,
                           dtype=fc.weight.dtype, device=fc.weight.device)
        linear.weight.copy_(weight.flatten(1))
        if fc.bias is not None:
            linear.bias.copy_(fc.bias)
    folded.avgpool = nn.Identity()
    folded.classifier[0] = linear
    return folded.eval().requires_grad_(False)
