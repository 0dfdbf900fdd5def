"""LRP rules on fxcanon's modules: bias maps under every rule, the gated threshold rule, EB, presets."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("zennit")
from zennit.rules import AlphaBeta, Epsilon, ZPlus

from fxcanon import canonicalize
from fxcanon.equivalence import randomize_batchnorms
from fxcanon.modules import ThresholdReLU
from fxcanon.xai import attribute, lrp_composite, with_bias_maps

D = torch.float64


def fused(layer, seed=0, pad=None):
    """``layer(BN(x))`` (after ``F.pad(value=1.5)`` when ``pad``) canonized: a fused layer, with a bias
    map where the layer pads with zeros."""
    torch.manual_seed(seed)
    bn = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(layer.in_channels)), seed)[0]
    model = nn.Sequential(bn, *([nn.ConstantPad2d(pad, 1.5)] if pad else []), layer).eval().double()
    gm = canonicalize(model, torch.randn(1, layer.in_channels, 6, 6, dtype=D))
    (module,) = [m for m in gm.modules() if isinstance(m, type(layer))]
    return module


def layer_relevance(module, rule, x, seed_relevance):
    rule = with_bias_maps(rule.copy())
    handles = rule.register(module)
    try:
        x = x.clone().requires_grad_(True)
        y = module(x)
        (relevance,) = torch.autograd.grad(y, x, seed_relevance)
    finally:
        handles.remove()
    return relevance


@pytest.mark.parametrize("rule", [ZPlus(), AlphaBeta(2.0, 1.0), Epsilon()], ids=["zplus", "alpha2beta1", "epsilon"])
def test_interior_relevance_equals_the_unpadded_fold(rule):
    """The bias map is ``b + sum(W t)`` in the interior: relevance seeded there equals that of an unpadded
    conv with that vector bias."""
    module = fused(nn.Conv2d(3, 4, 3, padding=1))
    assert module.has_bias_map
    plain = nn.Conv2d(3, 4, 3, padding=0).double()
    with torch.no_grad():
        plain.weight.copy_(module.weight)
        plain.bias.copy_(module(torch.zeros(1, 3, 3, 3, dtype=D))[0, :, 1, 1])
    x = torch.randn(1, 3, 7, 7, dtype=D, generator=torch.Generator().manual_seed(1))
    inner = torch.rand(1, 4, 5, 5, dtype=D, generator=torch.Generator().manual_seed(2))
    padded_seed = F.pad(inner, (1, 1, 1, 1))
    torch.testing.assert_close(layer_relevance(module, rule, x, padded_seed), layer_relevance(plain, rule, x, inner),
                               rtol=1e-12, atol=1e-12)


def passes(rule, module, x):
    """The outputs of each of ``rule``'s modified forward passes."""
    rule = with_bias_maps(rule.copy())
    outputs = []
    for input_mod, param_mod in zip(rule.input_modifiers, rule.param_modifiers):
        with param_mod(module) as modified:
            outputs.append(modified.forward(input_mod(x)))
    return outputs


def plain_layer(module, x, weight):
    if isinstance(module, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, None, module.stride, module.padding, module.output_padding,
                                  module.groups, module.dilation)
    return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)


@settings(max_examples=25)
@given(transposed=st.booleans(), kernel=st.integers(1, 3), padding=st.integers(0, 2), stride=st.integers(1, 2),
       channels=st.integers(1, 3), pad=st.sampled_from([None, (1, 0, 0, 1)]), seed=st.integers(0, 2 ** 16))
def test_no_negative_contribution_enters_a_positive_sum(transposed, kernel, padding, stride, channels, pad, seed):
    """ZPlus/alpha-beta's positive (negative) terms are the positive (negative) input-weight products plus
    the positive (negative) part of the layer's bias at each position, ``layer(0)``."""
    padding = min(padding, kernel - 1) if transposed else padding
    kind = nn.ConvTranspose2d if transposed else nn.Conv2d
    pad = None if transposed else pad
    module = fused(kind(channels, 2, kernel, stride=stride, padding=padding), seed, pad)
    x = torch.randn(2, channels, 5, 4, dtype=D, generator=torch.Generator().manual_seed(seed))
    bias = module(torch.zeros_like(x))
    w = module.weight
    positive = plain_layer(module, x.clamp(min=0), w.clamp(min=0)) + plain_layer(module, x.clamp(max=0), w.clamp(max=0))
    negative = plain_layer(module, x.clamp(min=0), w.clamp(max=0)) + plain_layer(module, x.clamp(max=0), w.clamp(min=0))
    zplus = passes(ZPlus(), module, x)
    alpha_beta = passes(AlphaBeta(2.0, 1.0), module, x)
    for term in zplus + alpha_beta[:2]:
        assert (term >= 0).all()
    for term in alpha_beta[2:]:
        assert (term <= 0).all()
    torch.testing.assert_close(sum(zplus), positive + bias.clamp(min=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(alpha_beta[:2]), positive + bias.clamp(min=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(alpha_beta[2:]), negative + bias.clamp(max=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(passes(Epsilon(), module, x)), module(x), rtol=1e-12, atol=1e-12)


def test_outside_leaves_the_bias_map_out_of_the_rules():
    module = fused(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(1, 3, 6, 6, dtype=D)
    rule = with_bias_maps(Epsilon(), "outside")
    with rule.param_modifiers[0](module) as modified:
        torch.testing.assert_close(modified.forward(x), module(x) - module.bias_map(x))


def bn_relu_conv(pre_activation=False):
    """``conv1 -> bn -> relu -> conv2`` (padded); ``pre_activation`` puts ``relu -> bn0 -> relu`` first, a
    BatchNorm that follows no layer (DenseNet's order)."""
    head = [nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU()] if pre_activation else []
    model = nn.Sequential(*head, nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                          nn.Flatten())
    x = torch.randn(1, 3, 8, 8, dtype=D, generator=torch.Generator().manual_seed(0))
    return randomize_batchnorms(model).eval().double(), x


def bias_maps(gm):
    return sum(getattr(m, "bias_kernel", None) is not None for m in gm.modules())


def test_prefer_chooses_where_a_batchnorm_folds():
    model, x = bn_relu_conv()
    forward, through = canonicalize(model, x), canonicalize(model, x, prefer="threshold")
    assert not any(isinstance(m, ThresholdReLU) for m in forward.modules()) and bias_maps(forward) == 0
    assert any(isinstance(m, ThresholdReLU) for m in through.modules()) and bias_maps(through) == 1
    assert bias_maps(canonicalize(model, x, preset="paper")) == 0  # post-activation: forward, as zennit merges
    pre, y = bn_relu_conv(pre_activation=True)
    assert bias_maps(canonicalize(pre, y)) == 0 and bias_maps(canonicalize(pre, y, preset="paper")) == 1
    for gm, m, z in ((forward, model, x), (through, model, x), (canonicalize(pre, y, preset="paper"), pre, y)):
        torch.testing.assert_close(gm(z), m(z), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        canonicalize(model, x, prefer="backward")


def test_threshold_relevance_is_absorbed_where_the_gate_is_off():
    """Relevance reaching an off unit (constant output) does not reach the input."""
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                                                       nn.Flatten())).eval()
    model = model.double()
    x = torch.randn(1, 4, 6, 6, dtype=D)
    relevance, _ = attribute(model, x, 0, "epsilon", init="logit")
    bn = model[0]
    off = bn(x) <= 0
    assert off.any() and (relevance[off] == 0).all() and (relevance[~off] != 0).any()


def test_eb_puts_no_rule_on_activations_and_batchnorms():
    """As zennit's ExcitationBackprop: their gradient flows; the other composites pass relevance through."""
    model, x = bn_relu_conv()
    baseline = canonicalize(model, x, passes=())
    for name, hooked in (("eb", False), ("epsilon_plus", True)):
        layers = [baseline.get_submodule(str(i)) for i in range(4)]  # copies: canonicalize shares nothing
        with lrp_composite(name).context(baseline):
            assert bool(layers[1]._forward_hooks) is hooked and bool(layers[2]._forward_hooks) is hooked
            assert layers[0]._forward_hooks and layers[3]._forward_hooks


def test_paper_preset_differs_only_on_pre_activation_networks():
    model, x = bn_relu_conv()
    torch.testing.assert_close(attribute(model, x, 0, "alpha2_beta1")[0],
                               attribute(model, x, 0, "alpha2_beta1", preset="paper")[0], rtol=1e-12, atol=0)
    pre, y = bn_relu_conv(pre_activation=True)
    principled, out = attribute(pre, y, 36, "alpha2_beta1")
    paper, out_paper = attribute(pre, y, 36, "alpha2_beta1", preset="paper")
    torch.testing.assert_close(out, out_paper, rtol=1e-12, atol=1e-12)
    assert (principled - paper).abs().max() > 1e-6 * paper.abs().max()
    with pytest.raises(ValueError):
        attribute(model, x, 0, "eb", preset="paper", init="logit")


def test_explain_command_shows_the_paper_preset_beside_the_defaults(tmp_path):
    from PIL import Image

    from fxcanon.cli import main

    out = tmp_path / "fig.png"
    assert main(["explain", "densenet121", "--size", "32", "--paper", "--composite", "eb", "--out", str(out)]) == 0
    assert Image.open(out).width > 4 * 32
