"""Hypothesis: random layers, BatchNorms, shapes, padding, dtypes and devices; exact folds only.

Every canonized model is compared with the float64 original: relative error <= 1e-10 in float64,
and in float32/float16/bfloat16 at most about twice the original model's own error.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from fxcanon import canonicalize, get_report
from fxcanon.equivalence import check_equivalence

from conftest import DEVICES

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def randomize_statistics(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> None:
    """Random statistics with zero-gamma channels and tiny variances."""
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n, generator=g) * 4 - 2)
        var = torch.rand(n, generator=g) * 3 + 0.1
        var[torch.rand(n, generator=g) < 0.2] = 1e-6
        bn.running_var.copy_(var)
        if bn.affine:
            gamma = torch.rand(n, generator=g) * 4 - 2
            gamma[torch.rand(n, generator=g) < 0.2] = 0.0
            bn.weight.copy_(gamma)
            bn.bias.copy_(torch.rand(n, generator=g) * 2 - 1)


@st.composite
def conv_models(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))  # layer init and inputs: reproducible per example
    dims = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    if transposed:
        padding = draw(st.integers(0, (kernel - 1) * dilation))
        output_padding = draw(st.integers(0, max(0, max(stride, dilation) - 1)))
        layer = CONV_T[dims](c_in, c_out, kernel, stride=stride, padding=padding, output_padding=output_padding,
                             groups=groups, bias=bias, dilation=dilation)
    else:
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
        padding = draw(st.sampled_from([0, 1, 2] + (["same"] if stride == 1 else [])))
        layer = CONV[dims](c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                           bias=bias, padding_mode=mode)
    before, after = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    affine = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    parts = []
    if before:
        parts.append(BN[dims](c_in, eps=eps, affine=affine))
    parts.append(layer)
    if after:
        parts.append(BN[dims](c_out, eps=eps, affine=draw(st.booleans())))
    model = nn.Sequential(*parts).eval()
    seed = draw(st.integers(0, 2**16))
    for i, m in enumerate(model):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_statistics(m, seed + i)
    sizes = draw(st.lists(st.tuples(*[st.integers(1, 7)] * dims), min_size=2, max_size=3))
    batch = draw(st.integers(1, 3))
    return model, [(torch.randn(batch, c_in, *size),) for size in sizes]


def runs(model, inputs):
    try:
        with torch.no_grad():
            return all(model(*x).numel() > 0 for x in inputs)
    except RuntimeError:
        return False


@pytest.mark.parametrize("device", DEVICES)
@given(case=conv_models(), dtype=st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
       channels_last=st.booleans())
def test_conv_batchnorm_folds_are_exact(device, case, dtype, channels_last):
    model, inputs = case
    assume(runs(model, inputs))
    model, inputs = model.to(device), [tuple(t.to(device) for t in x) for x in inputs]
    layer = next(m for m in model if not isinstance(m, nn.modules.batchnorm._BatchNorm))
    rank = inputs[0][0].dim()
    if channels_last and rank in (4, 5):
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
        inputs = [tuple(t.contiguous(memory_format=fmt) for t in x) for x in inputs]
    result = check_equivalence(model, inputs[0], inputs, dtype=dtype)
    assert result.float64 <= 1e-10, result
    # Folding moves rounding: where outputs cancel (one channel, large shifts) a few ulps of the
    # output scale separate the two forms even when both are right; wrong folds miss by far more.
    assert result.holds(factor=2.0, floor=8 * torch.finfo(dtype).eps), result
    gm = canonicalize(model, inputs[0])
    assert not get_report(gm).left, get_report(gm)
    fused = [m for m in gm.modules() if isinstance(m, type(layer))]
    assert len(fused) == 1 and type(fused[0]) is not type(layer) and all(m.weight.dtype == layer.weight.dtype and m.weight.device == layer.weight.device
                         for m in fused)
    if channels_last and rank in (4, 5):
        assert all(m.weight.is_contiguous(memory_format=fmt) for m in fused)
