"""Small BatchNorm networks of the zoo's families, for 64x64 inputs, trainable on a CPU in minutes.

They reuse torchvision's building blocks (``BasicBlock``, ``DenseNet``, ``EfficientNet``'s MBConv)
so they contain the same patterns as the full-size models: conv -> BN, residual sums with
downsampling branches, BN -> ReLU -> conv (DenseNet), squeeze-excitation gates (EfficientNet).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import DenseNet
from torchvision.models.efficientnet import EfficientNet, MBConvConfig
from torchvision.models.resnet import BasicBlock
from torchvision.models.vgg import make_layers

from .relation_network import RelationNetwork


def small_vgg(num_classes: int) -> nn.Module:
    """VGG with BatchNorm: four conv stages (16-64 channels) and a two-layer classifier."""
    return nn.Sequential(make_layers([16, "M", 32, "M", 64, "M", 64, "M"], batch_norm=True),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, num_classes))


def small_resnet(num_classes: int) -> nn.Module:
    """ResNet with one basic block per stage (16, 32, 64 channels) after a stride-2 stem."""
    def down(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 1, 2, bias=False), nn.BatchNorm2d(o))

    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         BasicBlock(16, 16), BasicBlock(16, 32, 2, down(16, 32)), BasicBlock(32, 64, 2, down(32, 64)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def small_densenet(num_classes: int) -> nn.Module:
    """torchvision's DenseNet with growth rate 8 and three blocks of two layers."""
    return DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, bn_size=2, num_classes=num_classes)


def small_efficientnet(num_classes: int) -> nn.Module:
    """torchvision's EfficientNet with three MBConv stages (squeeze-excitation, SiLU)."""
    setting = [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 1), MBConvConfig(4, 3, 2, 24, 32, 1)]
    return EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.0, num_classes=num_classes, last_channel=64)


def small_relation_network(num_classes: int, vocabulary: int) -> nn.Module:
    """The Relation Network for 64x64 Sort-of-CLEVR images (3x3 objects)."""
    return RelationNetwork(image_size=64, padding=0, vocabulary=vocabulary, embedding=32, hidden=64,
                           answers=num_classes)


SMALL_MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg": small_vgg, "resnet": small_resnet, "densenet": small_densenet, "efficientnet": small_efficientnet,
    "rn": small_relation_network,
}
