"""``preset="paper"`` against a reference of Pahde et al.'s explanations written here from the design
notes: zennit's own composites on models canonized the paper's way by the code below.

The reference folds BatchNorms itself, in the order children are registered: ``conv -> bn`` merged
forward (VGG, ResNet, EfficientNet; no eps residue), DenseNet thresh-first (``bn -> relu -> conv``:
a threshold module with no LRP rule, whose gradient is the gate, and the shift in the conv's input;
a zero-padded conv gets the bias map from a forward hook, so the rules never see it), the Relation
Network's BatchNorms into the next conv and into g1's image columns. Explicit sums, gates and
pooling (the paper's structural canonizers) come from ``STRUCTURAL_PASSES``.
"""

import copy
from itertools import pairwise

import pytest
import torch
from torch import nn

pytest.importorskip("zennit")
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonPlus,
    ExcitationBackprop,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.core import Hook
from zennit.rules import Norm, ZBox, ZPlus
from zennit.types import Convolution, Linear

from fxcanon import canonicalize
from fxcanon.equivalence import randomize_batchnorms
from fxcanon.models import RelationNetwork
from fxcanon.modules import Gate, Sum
from fxcanon.passes import STRUCTURAL_PASSES
from fxcanon.xai import attribute
from fxcanon.zoo import build

D = torch.float64
IMAGE_COMPOSITES = ["eb", "epsilon_plus", "alpha2_beta1"]


def affine(bn):
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return s.detach(), (bn.bias - s * bn.running_mean).detach()


def merged(conv, bn):
    """``bn(conv(x))`` as one conv."""
    s, t = affine(bn)
    out = copy.deepcopy(conv)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(s)
    out.weight = nn.Parameter(conv.weight * s.view(-1, *[1] * (conv.weight.dim() - 1)))
    out.bias = nn.Parameter(s * bias + t)
    return out


def shifted(layer, s, t, columns=None):
    """``layer(s * x + t)`` (on ``columns`` of a Linear's input) with the shift in the bias; a
    zero-padded conv gets the position-dependent rest from a forward hook (the paper's bias map)."""
    out = copy.deepcopy(layer)
    columns = slice(None) if columns is None else columns
    weight = layer.weight.detach().clone()
    view = (1, -1) + (1,) * (weight.dim() - 2)
    weight[:, columns] = weight[:, columns] * s.view(view)
    out.weight = nn.Parameter(weight)
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    padded = isinstance(layer, nn.Conv2d) and any(p > 0 for p in layer.padding)
    if padded:
        original = layer.weight.detach()
        out.register_forward_hook(lambda module, args, output: output + module._conv_forward(
            t.view(1, -1, 1, 1).expand_as(args[0][:1]), original, None))
    else:
        shift = (layer.weight.detach()[:, columns] * t.view(view)).flatten(1).sum(1)
        out.bias = nn.Parameter(bias + shift)
    return out


class Threshold(nn.Module):
    """The paper's threshold activation ``h(x) = x if s*x + t > 0 else -t/s``; no rule attaches to it."""

    def __init__(self, s, t):
        super().__init__()
        self.s, self.t = s.view(1, -1, 1, 1), t.view(1, -1, 1, 1)

    def forward(self, x):
        return torch.where(self.s * x + self.t > 0, x, -self.t / self.s)


def fold_children(module, thresh_first):
    """Fold ``bn -> relu -> conv`` (if ``thresh_first``) and then ``conv -> bn`` among consecutive children."""
    names = list(module._modules)
    kids = module._modules
    if thresh_first:
        for a, b, c in zip(names, names[1:], names[2:]):
            if isinstance(kids[a], nn.BatchNorm2d) and isinstance(kids[b], nn.ReLU) and isinstance(kids[c], nn.Conv2d):
                s, t = affine(kids[a])
                kids[a], kids[b], kids[c] = Threshold(s, t), nn.Identity(), shifted(kids[c], s, t)
    for a, b in pairwise(names):
        if isinstance(kids[a], nn.Conv2d) and isinstance(kids[b], nn.BatchNorm2d):
            kids[a], kids[b] = merged(kids[a], kids[b]), nn.Identity()
    for child in kids.values():
        fold_children(child, thresh_first)


class DenseNetTail(nn.Module):
    """DenseNet with ``norm5 -> relu -> pool -> classifier`` folded thresh-first into the classifier."""

    def __init__(self, densenet):
        super().__init__()
        s, t = affine(densenet.features.norm5)
        densenet.features.norm5 = Threshold(s, t)
        self.features, self.pool = densenet.features, nn.AdaptiveAvgPool2d(1)
        self.classifier = shifted(densenet.classifier, s, t)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def relation_network_folded(rn):
    """Each image BatchNorm (after its ReLU) into the next conv; the last into g1's image columns."""
    layers = list(rn.encoder)
    for i in range(len(layers) // 3):
        s, t = affine(layers[3 * i + 2])
        rn.encoder[3 * i + 2] = nn.Identity()
        if 3 * i + 3 < len(layers):
            rn.encoder[3 * i + 3] = shifted(layers[3 * i + 3], s, t)
    c = s.numel()
    twice_s, twice_t = torch.cat([s, torch.ones(2, dtype=D), s]), torch.cat([t, torch.zeros(2, dtype=D), t])
    rn.g[0] = shifted(rn.g[0], twice_s, twice_t, columns=slice(0, 2 * c + 2))
    return rn


class ToSignal(Hook):
    def backward(self, module, grad_input, grad_output):
        return (grad_output[0], torch.zeros_like(grad_input[1]))


def reference_composite(name, low=None, high=None):
    extra = [(Sum, Norm()), (Gate, ToSignal())]
    if name == "rn_custom":
        return SpecialFirstLayerMapComposite(layer_map=extra + layer_map_base() + [(Linear, ZPlus())],
                                             first_map=[(Convolution, ZBox(low, high))])
    return {"eb": ExcitationBackprop, "epsilon_plus": EpsilonPlus, "alpha2_beta1": EpsilonAlpha2Beta1}[name](
        layer_map=extra)


def reference_relevance(model, inputs, target, composite):
    x = inputs[0].clone().requires_grad_(True)
    with composite.context(model) as modified:
        output = modified(x, *inputs[1:])
        (relevance,) = torch.autograd.grad(output, x, torch.zeros_like(output).index_fill(1, torch.tensor([target]), 1))
    return relevance


def reference_model(name, model, inputs):
    model = copy.deepcopy(model)
    if name == "relation_network":
        model = relation_network_folded(model)
    else:
        fold_children(model, thresh_first=name.startswith("densenet"))
        if name.startswith("densenet"):
            model = DenseNetTail(model)
    return canonicalize(model, inputs, passes=STRUCTURAL_PASSES)


def setup(name):
    torch.manual_seed(0)
    if name == "relation_network":
        model = randomize_batchnorms(RelationNetwork(padding=0)).eval().double()
        image, question = model.example_inputs(batch_size=1)
        return model, (image.double(), question), ["rn_custom", *IMAGE_COMPOSITES]
    x = torch.randn(1, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(1))
    return build(name).double(), (x,), IMAGE_COMPOSITES


@pytest.mark.parametrize("name", ["densenet121", "efficientnet_b0", "resnet18", "vgg16_bn", "relation_network"])
def test_paper_preset_reproduces_the_papers_relevance(name):
    model, inputs, composites = setup(name)
    reference = reference_model(name, model, inputs)
    ours = canonicalize(model, inputs, preset="paper")
    bounds = {"low": torch.full_like(inputs[0], -3.0), "high": torch.full_like(inputs[0], 3.0)}
    torch.testing.assert_close(ours(*inputs), reference(*inputs), rtol=1e-10, atol=1e-10)
    for composite in composites:
        kwargs = bounds if composite == "rn_custom" else {}
        expected = reference_relevance(reference, inputs, 5, reference_composite(composite, **kwargs))
        relevance, _ = attribute(ours, inputs, 5, composite, preset="paper", **kwargs)
        scale = expected.abs().max()
        assert scale > 0
        assert (relevance - expected).abs().max() <= 1e-8 * scale, composite
