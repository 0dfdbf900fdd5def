"""Fold math on its own: exact, small, including the supplement's worked example (A.16-A.20)."""

import torch
import torch.nn.functional as F
from torch import nn

from fxcanon import FusedConv2d, canonicalize
from fxcanon.fold_math import (LayerTensors, batchnorm_affine, channel_affine, fold_into_input, fold_into_output,
                               scale_input_channels, scale_output_channels)

D = torch.float64


def test_batchnorm_affine_matches_eval_batchnorm():
    bn = nn.BatchNorm1d(5, eps=1e-3).double().eval()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.1, 3)
    bn.weight.data.uniform_(-2, 2), bn.bias.data.uniform_(-1, 1)
    s, t = batchnorm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    x = torch.randn(7, 5, dtype=D)
    torch.testing.assert_close(s * x + t, bn(x), rtol=0, atol=1e-14)


def test_batchnorm_affine_without_affine_parameters():
    s, t = batchnorm_affine(torch.tensor([1.0]), torch.tensor([4.0]), None, None, 0.0)
    assert s.item() == 0.5 and t.item() == -0.5


def test_scale_channels_against_explicit_loops():
    torch.manual_seed(0)
    for groups, transposed in ((1, False), (2, False), (3, True), (2, True)):
        c_in, c_out = 6, 6
        w = torch.randn((c_in, c_out // groups, 3) if transposed else (c_out, c_in // groups, 3), dtype=D)
        s_out, s_in = torch.randn(c_out, dtype=D), torch.randn(c_in, dtype=D)
        expected_out, expected_in = w.clone(), w.clone()
        for g in range(groups):
            for i in range(c_in // groups):
                for j in range(c_out // groups):
                    ci, co = g * (c_in // groups) + i, g * (c_out // groups) + j
                    if transposed:
                        expected_out[ci, j] *= s_out[co]
                        expected_in[ci, j] *= s_in[ci]
                    else:
                        expected_out[co, i] *= s_out[co]
                        expected_in[co, i] *= s_in[ci]
        assert torch.equal(scale_output_channels(w, s_out, transposed=transposed, groups=groups), expected_out)
        assert torch.equal(scale_input_channels(w, s_in, transposed=transposed, groups=groups), expected_in)


def test_fold_into_output_linear():
    w, b = torch.randn(4, 3, dtype=D), torch.randn(4, dtype=D)
    s, t = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    fused = fold_into_output(LayerTensors(w, b), s, t)
    x = torch.randn(5, 3, dtype=D)
    torch.testing.assert_close(x @ fused.weight.T + fused.bias, s * (x @ w.T + b) + t, rtol=0, atol=1e-13)


def test_fold_into_input_vector_bias_and_identity_columns():
    w, b = torch.randn(4, 6, dtype=D), torch.randn(4, dtype=D)
    s, t = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    channel_map = torch.tensor([0, 1, -1, 2, -1, 0])
    s_in, t_in = channel_affine(channel_map, s, t)
    fused = fold_into_input(LayerTensors(w, b), s_in, t_in, vector_bias=True)
    x = torch.randn(5, 6, dtype=D)
    torch.testing.assert_close(x @ fused.weight.T + fused.bias, (s_in * x + t_in) @ w.T + b, rtol=0, atol=1e-13)
    assert torch.equal(fused.weight[:, [2, 4]], w[:, [2, 4]])  # columns outside the BatchNorm untouched


def test_fold_into_input_vector_bias_of_grouped_convolutions():
    """The summed shift equals the sum of ``W diag(t)`` for groups, 1x1 and larger kernels, in float32 too."""
    torch.manual_seed(1)
    for groups, kernel, dtype in ((1, 1, D), (2, 3, D), (3, 1, torch.float32), (6, 2, torch.float32)):
        w, b = torch.randn(6, 6 // groups, kernel, kernel, dtype=dtype), torch.randn(6, dtype=D)
        s, t = torch.randn(6, dtype=D), torch.randn(6, dtype=D)
        before = w.clone()
        fused = fold_into_input(LayerTensors(w, b), s, t, groups=groups, vector_bias=True)
        assert torch.equal(w, before)  # scaled on a copy
        shift = scale_input_channels(w.double(), t, groups=groups).flatten(1).sum(1)
        torch.testing.assert_close(fused.bias, b + shift, rtol=0, atol=1e-13)
        assert torch.equal(fused.weight, scale_input_channels(w.double(), s, groups=groups).to(dtype))
        x = torch.randn(2, 6, 5, 5, dtype=D)
        torch.testing.assert_close(F.conv2d(x, fused.weight.double(), fused.bias, groups=groups),
                                   F.conv2d(s[:, None, None] * x + t[:, None, None], w.double(), b, groups=groups),
                                   rtol=0, atol=1e-12 if dtype == D else 1e-5)


def test_vector_bias_of_weights_scaled_in_several_blocks():
    """Weights of more than one float64 block, blocked along groups, output or input channels or
    taps: the weight is the rounded float64 product, the shift the float64 sum."""
    torch.manual_seed(3)
    for shape, groups in (((4, 70000), 1), ((4, 40000, 1, 2), 2), ((1, 300000), 1), ((1, 1, 600, 600), 1)):
        w, b = torch.randn(shape), torch.randn(shape[0], dtype=D)
        channels = shape[1] * groups
        s, t = torch.rand(channels, dtype=D) + 0.5, torch.randn(channels, dtype=D)
        fused = fold_into_input(LayerTensors(w, b), s, t, groups=groups, vector_bias=True)
        shift = scale_input_channels(w.double(), t, groups=groups).flatten(1).sum(1)
        torch.testing.assert_close(fused.bias, b + shift, rtol=1e-12, atol=1e-9)
        assert torch.equal(fused.weight, scale_input_channels(w.double(), s, groups=groups).float())


def test_scaled_weights_of_lower_precision_are_the_rounded_float64_product():
    """Blocks or not, any layout and dtype: the float64 product rounded once, the input untouched."""
    torch.manual_seed(2)
    for shape, dtype in (((600, 700), torch.float32), ((3, 40000, 3), torch.float16), ((1, 300000), torch.bfloat16),
                         ((513, 4, 3, 3), torch.float32)):
        w = torch.randn(shape, dtype=dtype)
        if w.dim() == 4:
            w = w.to(memory_format=torch.channels_last)
        s = torch.rand(shape[0], dtype=D) + 0.5
        before = w.clone()
        scaled = scale_output_channels(w, s)
        assert torch.equal(w, before) and scaled.dtype == dtype and scaled.stride() == w.stride()
        assert torch.equal(scaled, (w.double() * s.reshape(-1, *[1] * (w.dim() - 1))).to(dtype))
        grouped = scale_input_channels(w, torch.rand(shape[1], dtype=D), transposed=False, groups=1)
        assert grouped.dtype == dtype and grouped.shape == w.shape


def _worked_example():
    """Supplement A.16-A.20: 3x3 input, 2x2 ones kernel, padding 1, BN with shift 1."""
    conv = nn.Conv2d(1, 1, 2, padding=1, bias=False).double()
    conv.weight.data.fill_(1.0)
    bn = nn.BatchNorm2d(1, eps=0.0).double().eval()
    bn.bias.data.fill_(1.0)
    model = nn.Sequential(bn, conv).eval()
    x = torch.tensor([[1, 2, 3], [2, 3, 4], [3, 4, 5]], dtype=D).reshape(1, 1, 3, 3)
    return model, x


def test_worked_example_A16_A20():
    model, x = _worked_example()
    a18 = torch.tensor([[2, 5, 7, 4], [5, 12, 16, 9], [7, 16, 20, 11], [4, 9, 11, 6]], dtype=D)
    a19_weights = torch.tensor([[1, 3, 5, 3], [3, 8, 12, 7], [5, 12, 16, 9], [3, 7, 9, 5]], dtype=D)
    a19_bias = torch.tensor([[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]], dtype=D)
    assert torch.equal(model(x)[0, 0], a18)
    gm = canonicalize(model)
    fused = next(m for m in gm.modules() if isinstance(m, FusedConv2d))
    assert torch.equal(gm(x)[0, 0], a18)
    assert torch.equal(fused.bias_map(x)[0, 0], a19_bias)
    assert torch.equal(F.conv2d(x, fused.weight, fused.bias, padding=1)[0, 0], a19_weights)
