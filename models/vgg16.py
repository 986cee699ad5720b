"""VGG16 (Simonyan & Zisserman 2015), configuration "D", laid out exactly like torchvision.

Module names (``features.N``, ``classifier.N``) match ``torchvision.models.vgg16`` so a
torchvision-format state_dict loads (see :func:`models.zoo.load_init_weights`).
ReLUs are not in-place: :mod:`models.saliency` reads every activation after the forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

# Channels per conv, "M" = 2×2 max pool (torchvision's cfgs["D"]).
CFG_D: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"
]  # fmt: skip


def make_features(cfg: list[int | str], in_channels: int, batch_norm: bool) -> nn.Sequential:
    """Conv(3×3, pad 1) [→ BatchNorm] → ReLU per number in ``cfg``, MaxPool(2) per "M"."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(v, int)
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=False))
        in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """torchvision's VGG: ``features`` → AdaptiveAvgPool(7×7) → flatten → ``classifier``."""

    def __init__(self, features: nn.Sequential, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        # Same init as torchvision, so training from scratch behaves like the reference.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))  # (N, 512, 7, 7)
        return self.classifier(torch.flatten(x, 1))


def _vgg(num_classes: int, in_channels: int, image_size: int, batch_norm: bool) -> VGG:
    # Five 2×2 pools: below 32 px the last one would see an empty map.
    if image_size < 32:
        raise ValueError(f"vgg16 needs image_size >= 32 (five 2x2 max pools), got {image_size}")
    return VGG(make_features(CFG_D, in_channels, batch_norm), num_classes)


def vgg16(num_classes: int, in_channels: int, image_size: int) -> VGG:
    """Build VGG16 (configuration "D").

    Args:
        num_classes: number of output logits.
        in_channels: image channels (1 or 3).
        image_size: square input side, >= 32. The adaptive pool makes the head size-independent.

    Returns:
        The model, initialised like torchvision.
    """
    return _vgg(num_classes, in_channels, image_size, batch_norm=False)


def vgg16_bn(num_classes: int, in_channels: int, image_size: int) -> VGG:
    """Build VGG16 with BatchNorm after every conv. Arguments and return as :func:`vgg16`."""
    return _vgg(num_classes, in_channels, image_size, batch_norm=True)
