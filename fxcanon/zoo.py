"""The torchvision models the supplement evaluates, and their relatives, built without downloads."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torch.fx import GraphModule

from .equivalence import randomize_batchnorms
from .inventory import is_batchnorm_call

# name -> family: one model of each family runs in the default test suite
ZOO: dict[str, str] = {
    "vgg16_bn": "vgg", "resnet18": "resnet", "resnet50": "resnet", "efficientnet_b0": "efficientnet",
    "efficientnet_b4": "efficientnet", "densenet121": "densenet", "densenet161": "densenet",
    "mobilenet_v2": "mobilenet", "mobilenet_v3_large": "mobilenet", "googlenet": "googlenet",
    "inception_v3": "inception", "regnet_y_400mf": "regnet", "shufflenet_v2_x1_0": "shufflenet",
    "convnext_tiny": "convnext",
}
# smallest comfortable input side for models that need more than 32 pixels
MIN_SIZE = {"inception_v3": 75, "googlenet": 32}


def build(name: str, seed: int = 0) -> nn.Module:
    """``torchvision.models.<name>(weights=None)`` in eval mode with randomized BatchNorms.

    ``name`` may also be ``"package.module:callable"``: the callable builds the model (kept as is).
    """
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        factory: Callable[[], nn.Module] = getattr(importlib.import_module(module_name), attribute)
        return factory().eval()
    torch.manual_seed(seed)
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return randomize_batchnorms(model, seed).eval()


def example_inputs(model: nn.Module, name: str, size: int = 224, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """The model's own ``example_inputs()`` if it has one, else a random image batch."""
    own = getattr(model, "example_inputs", None)
    if callable(own):
        return tuple(own())
    side = max(size, MIN_SIZE.get(name, 32))
    return (torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0)),)


def count_batchnorms(gm: GraphModule) -> int:
    """BatchNorm calls in a graph, in any spelling, InstanceNorms with running statistics included
    (:func:`fxcanon.inventory.is_batchnorm_call`)."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    return sum(is_batchnorm_call(gm, node, modules) for node in gm.graph.nodes)
