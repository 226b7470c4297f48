"""Small vmappable models. Every model maps ``[B, *input_shape] -> [B, num_classes]`` logits and holds
no running statistics (GroupNorm instead of BatchNorm), so ``torch.func.vmap`` can run many clients'
copies at once."""

from __future__ import annotations

import math
from typing import Annotated

from torch import nn

from fedsim.core.components import option
from fedsim.core.errors import FedsimError


def _flat_dim(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) == 2:
        return (1, *input_shape)
    if len(input_shape) != 3:
        raise FedsimError(f"model '{model}' needs image input (C, H, W); the dataset gives shape {input_shape}")
    return input_shape  # type: ignore[return-value]


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: ``logits = W flat(x) + b``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_dim(input_shape), num_classes))


def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: Annotated[tuple[Annotated[int, option("width", ge=1)], ...], option("hidden layer widths")] = (100,),
) -> nn.Module:
    """Multilayer perceptron with ReLU: ``flat(x) -> hidden... -> num_classes``.

    Default: one hidden layer of 100 units (scikit-learn's ``MLPClassifier`` default); FedAvg's MNIST
    "2NN" is ``hidden=(200, 200)`` (``model: {name: mlp, hidden: [200, 200]}``)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = _flat_dim(input_shape)
    for h in tuple(hidden):
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5 (LeCun et al., 1998) with ReLU and max pooling: conv5x5(6, 'same') -> pool2 ->
    conv5x5(16) -> pool2 -> fc120 -> fc84 -> fc(num_classes). On inputs smaller than 20 pixels the second
    convolution is padded to keep its output non-empty (e.g. 8x8 digits)."""
    c, h, w = _image_shape(input_shape, "lenet5")
    pad2 = 0 if min(h, w) // 2 >= 10 else 2
    h2, w2 = (h // 2 - 4 + 2 * pad2) // 2, (w // 2 - 4 + 2 * pad2) // 2
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * h2 * w2, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )  # fmt: skip


def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    width: Annotated[int, option("channels of the first convolution (a multiple of 8)", ge=8, multiple_of=8)] = 32,
) -> nn.Module:
    """Small CNN with GroupNorm: [conv3x3(w) -> GN(8) -> ReLU -> pool2] -> [conv3x3(2w) -> GN(8) -> ReLU
    -> pool2] -> fc(4w) -> ReLU -> fc(num_classes). GroupNorm keeps it vmappable across clients."""
    c, h, w = _image_shape(input_shape, "cnn")
    h2, w2 = h // 4, w // 4
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * h2 * w2, 4 * width), nn.ReLU(),
        nn.Linear(4 * width, num_classes),
    )  # fmt: skip


class _BasicBlock(nn.Module):
    """conv3x3(stride) -> GN -> ReLU -> conv3x3 -> GN, plus the shortcut (conv1x1(stride) -> GN when the shape
    changes), then ReLU (He et al. 2016, with GroupNorm for BatchNorm)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout),
        )  # fmt: skip
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            projection = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.shortcut = nn.Sequential(projection, nn.GroupNorm(groups, cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


RESNETS = {20: ((16, 32, 64), (3, 3, 3)), 18: ((64, 128, 256, 512), (2, 2, 2, 2))}
"""depth -> (stage widths, basic blocks per stage): ResNet-20 of He et al.'s CIFAR section, ResNet-18 with a
3x3 stem for 32x32 inputs."""


def resnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    depth: Annotated[int, option("20 (CIFAR ResNet-20, 0.27M parameters) or 18 (ResNet-18, 11M)")] = 20,
    groups: Annotated[int, option("GroupNorm groups (divides every stage width)", ge=1)] = 8,
) -> nn.Module:
    """ResNet with GroupNorm (Hsieh et al. 2020 use GroupNorm for non-IID FL): a 3x3 stem, basic blocks in stages
    (the first block of each later stage halves the resolution), global average pooling and a linear head."""
    if depth not in RESNETS:
        raise FedsimError(f"resnet depth must be one of {', '.join(map(str, sorted(RESNETS)))}, got {depth}")
    widths, blocks = RESNETS[depth]
    if any(w % groups for w in widths):
        raise FedsimError(f"resnet groups {groups} must divide every stage width {widths}")
    c, _, _ = _image_shape(input_shape, "resnet")
    layers: list[nn.Module] = [
        nn.Conv2d(c, widths[0], 3, padding=1, bias=False), nn.GroupNorm(groups, widths[0]), nn.ReLU()
    ]  # fmt: skip
    cin = widths[0]
    for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        for b in range(count):
            layers.append(_BasicBlock(cin, width, 2 if stage > 0 and b == 0 else 1, groups))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)
