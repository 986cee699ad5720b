"""LeNet-5 (LeCun et al. 1998) with tanh activations and max pooling, sized for any input."""

from __future__ import annotations

import torch
from torch import nn


def _lenet_feature_size(image_size: int) -> int:
    """Side of the feature map after two (5×5 conv, no padding) → 2×2 pool stages."""
    side = image_size
    for _ in range(2):
        side = (side - 4) // 2
    return side


class LeNet5(nn.Module):
    """Conv 6@5×5 → Tanh → MaxPool2 → Conv 16@5×5 → Tanh → MaxPool2 → 120 → 84 → K.

    Same layout as :class:`models.vgg16.VGG`: ``features`` → ``avgpool`` (identity here) →
    flatten → ``classifier``, so :mod:`models.saliency` can walk both the same way.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 32) -> None:
        super().__init__()
        side = _lenet_feature_size(image_size)
        if side < 1:
            raise ValueError(f"lenet5 needs image_size >= 16, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.Tanh(),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.Identity()
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120),
            nn.Tanh(),
            nn.Linear(120, 84),
            nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))  # (N, 16, side, side)
        return self.classifier(torch.flatten(x, 1))


def lenet5(num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    """Build LeNet-5.

    Args:
        num_classes: number of output logits.
        in_channels: image channels (1 or 3).
        image_size: square input side; sets the first Linear's width. Must be >= 16.

    Returns:
        The model, randomly initialised (PyTorch defaults).
    """
    return LeNet5(num_classes, in_channels, image_size)
