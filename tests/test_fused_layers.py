"""Fused layers: exact bias maps, never stale, exportable, and independent of the caller's model."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from fxcanon import canonicalize
from fxcanon.equivalence import randomize_batchnorms, relative_error
from fxcanon.modules import FusedConv2d, FusedConvTranspose1d, FusedLinear, ThresholdReLU, conv_bias_map

D = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def all_ones_response(x, bias_kernel, pad_kernel, *, spatial_dims, transposed, stride, padding, dilation, groups,
                      output_padding, input_pad):
    """The bias map by its definition: the layer applied to all-ones with every input channel."""
    channels = x.shape[x.dim() - spatial_dims - 1]
    interior = torch.ones(1, channels, *x.shape[x.dim() - spatial_dims:], dtype=x.dtype)
    if input_pad:
        inner = torch.ones(1, channels, *(s - input_pad[2 * (spatial_dims - 1 - i)] - input_pad[2 * (spatial_dims - 1 - i) + 1]
                                         for i, s in enumerate(x.shape[x.dim() - spatial_dims:])), dtype=x.dtype)
        interior = F.pad(inner, input_pad)
    total = 0
    for mask, kernel in ((interior, bias_kernel), (1 - interior, pad_kernel)):
        if kernel is not None:
            total = total + (CONV_T[spatial_dims](mask, kernel, None, stride, padding, output_padding, groups, dilation)
                             if transposed else CONV[spatial_dims](mask, kernel, None, stride, padding, dilation, groups))
    return total if x.dim() == spatial_dims + 2 else total[0]


@st.composite
def bias_map_cases(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    dims = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride, dilation = (draw(st.integers(1, 2)),) * dims, (draw(st.integers(1, 2)),) * dims
    if transposed:
        padding = (draw(st.integers(0, (kernel - 1) * dilation[0])),) * dims
        output_padding = (draw(st.integers(0, max(stride[0], dilation[0]) - 1)),) * dims
        shape = (c_in, c_out // groups) + (kernel,) * dims
    else:
        padding = draw(st.sampled_from([(0,) * dims, (1,) * dims, (2,) * dims, "valid"]
                                       + (["same"] if stride[0] == 1 else [])))
        output_padding = ()
        shape = (c_out, c_in // groups) + (kernel,) * dims
    input_pad = tuple(draw(st.lists(st.integers(0, 2), min_size=2 * dims, max_size=2 * dims))) \
        if not transposed and draw(st.booleans()) else ()
    size = [draw(st.integers(1, 7)) for _ in range(dims)]
    if input_pad:
        size = [s + input_pad[2 * (dims - 1 - i)] + input_pad[2 * (dims - 1 - i) + 1] for i, s in enumerate(size)]
    batch = draw(st.sampled_from([(), (1,), (3,)]))
    x = torch.randn(*batch, c_in, *size, dtype=D)
    bias_kernel = torch.randn(shape, dtype=D)
    pad_kernel = torch.randn(shape, dtype=D) if input_pad else None
    hyper = dict(spatial_dims=dims, transposed=transposed, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, output_padding=output_padding, input_pad=input_pad)
    return x, bias_kernel, pad_kernel, hyper


@given(case=bias_map_cases())
def test_bias_map_on_one_channel_equals_the_all_ones_response(case):
    x, bias_kernel, pad_kernel, hyper = case
    try:
        expected = all_ones_response(x, bias_kernel, pad_kernel, **hyper)
    except RuntimeError:  # the layer itself rejects this size
        assume(False)
    got = conv_bias_map(x, bias_kernel, pad_kernel, **hyper)
    assert got.shape == expected.shape
    assert relative_error(got, expected) < 1e-13


def bias_map_module(gm):
    return next(m for m in gm.modules() if getattr(m, "has_bias_map", False))


def test_transposed_layer_with_output_size():
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1,
                                                                                     groups=2))).eval().double()
    layer = bias_map_module(canonicalize(model))
    x = torch.randn(2, 4, 5, 6, dtype=D)
    with torch.no_grad():
        for size in ([9, 11], [10, 12]):
            assert relative_error(layer(x, size), model[1](model[0](x), size)) < 1e-12


def bias_map_layer():
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))).eval()
    return bias_map_module(canonicalize(model))


def by_definition(layer, x):
    """The fused layer's output from its current Parameters, without the layer's own bias-map code."""
    return F.conv2d(x, layer.weight, layer.bias, 1, 1) + all_ones_response(
        x, layer.bias_kernel, None, spatial_dims=2, transposed=False, stride=(1, 1), padding=(1, 1),
        dilation=(1, 1), groups=1, output_padding=(), input_pad=())


@pytest.mark.parametrize("edit", ["vector_to_parameters", "data", "inplace"])
def test_bias_map_is_never_stale(edit):
    layer = bias_map_layer()
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            layer(x)
            if edit == "vector_to_parameters":
                vector_to_parameters(torch.randn_like(parameters_to_vector(layer.parameters())), layer.parameters())
            elif edit == "data":
                layer.bias_kernel.data.mul_(-1.5)
            else:
                layer.bias_kernel.add_(torch.randn_like(layer.bias_kernel))
            assert relative_error(layer(x), by_definition(layer, x)) < 1e-6


def test_bias_kernel_receives_gradients():
    layer = bias_map_layer()
    layer(torch.randn(1, 3, 5, 5)).sum().backward()
    assert layer.bias_kernel.grad is not None and layer.bias_kernel.grad.abs().sum() > 0


class PadConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(F.pad(self.bn(x), (1, 2, 0, 1), value=0.5))


def _bn_relu_conv():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    randomize_batchnorms(model)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -0.5, 0.0, 2.0]))  # every sign: no shortcut for positive scales
    return model


FUSED_CASES = {
    "conv1d": (lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 4, 3, padding=1)), (2, 3, 7)),
    "conv2d": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), (2, 3, 6, 5)),
    "conv3d": (lambda: nn.Sequential(nn.BatchNorm3d(3), nn.Conv3d(3, 4, 3, padding=1, groups=1)), (2, 3, 4, 5, 3)),
    "conv_transpose1d": (lambda: nn.Sequential(nn.BatchNorm1d(4), nn.ConvTranspose1d(4, 2, 3, stride=2, groups=2)),
                         (2, 4, 5)),
    "conv_transpose2d": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3, padding=1)),
                         (2, 3, 5, 4)),
    "conv_transpose3d": (lambda: nn.Sequential(nn.BatchNorm3d(3), nn.ConvTranspose3d(3, 2, 2, stride=2)),
                         (2, 3, 3, 2, 4)),
    "pad_kernel": (PadConv, (2, 3, 6, 5)),
    "threshold_relu": (_bn_relu_conv, (2, 4, 5, 5)),
}


def canonized_case(name):
    build, shape = FUSED_CASES[name]
    torch.manual_seed(0)
    model = randomize_batchnorms(build()).eval()
    x = torch.randn(shape)
    gm = canonicalize(model, (x,))
    kinds = {type(m) for m in gm.modules()}
    assert any(getattr(m, "has_bias_map", False) for m in gm.modules()) or ThresholdReLU in kinds
    return model, gm, x


@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_layers_export_and_compile_as_one_graph(name):
    model, gm, x = canonized_case(name)
    with torch.no_grad():
        expected = model(x)
        assert relative_error(gm(x), expected) < 1e-5
        exported = torch.export.export(gm, (x,))
        assert relative_error(exported.module()(x), expected) < 1e-5
        torch._dynamo.reset()
        assert relative_error(torch.compile(gm, backend="eager", fullgraph=True)(x), expected) < 1e-5
        torch._dynamo.reset()
        explained = torch._dynamo.explain(gm)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_fullgraph_inductor_compile_of_a_bias_map_model():
    model, gm, x = canonized_case("conv2d")
    torch._dynamo.reset()
    with torch.no_grad():
        gm(x)
        assert relative_error(torch.compile(gm, fullgraph=True)(x), model(x)) < 1e-5


def _caller_storages(model):
    return {t.untyped_storage().data_ptr(): t for t in (*model.parameters(), *model.buffers()) if t.numel()}


def _assert_independent(model, gm):
    """Every tensor of ``gm`` is either the caller's own (an unchanged module, shared on purpose) or
    a new leaf without an autograd link that shares no storage with the caller's model."""
    storages = _caller_storages(model)
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    for name, tensor in (*gm.named_parameters(), *gm.named_buffers()):
        if id(tensor) in own:
            continue
        assert tensor.grad_fn is None and tensor.is_leaf, name
        assert storages.get(tensor.untyped_storage().data_ptr()) is None, f"{name} shares storage with the caller"


class Mixed(nn.Module):
    """A bias-map fold (the bias kept as is), a threshold activation and a forward fold."""

    def __init__(self):
        super().__init__()
        self.bn0, self.conv0 = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)
        self.conv1, self.bn1 = nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn1(self.conv1(self.conv0(self.bn0(x)) + self.conv2(torch.relu(self.bn2(x)))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_canonized_model_shares_no_storage_and_no_autograd_link(dtype):
    model = randomize_batchnorms(Mixed()).eval().to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    gm = canonicalize(model, (x,))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    _assert_independent(model, gm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    own = {id(t) for t in model.parameters()}
    with torch.no_grad():
        for p in gm.parameters():
            if id(p) not in own:
                p.mul_(2.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_canonized_densenet_copies_and_backpropagates_twice():
    model = randomize_batchnorms(torchvision.models.densenet121(weights=None)).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = canonicalize(model, (x,))
    _assert_independent(model, gm)
    copy.deepcopy(gm)
    for _ in range(2):
        gm(x).sum().backward()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(p.grad is None for bn in batchnorms for p in bn.parameters())


@pytest.mark.parametrize("cls, args, kwargs", [
    (FusedLinear, (3, 5), {}),
    (FusedConv2d, (4, 6, (3, 3)), {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2),
                                   "groups": 2, "padding_mode": "reflect"}),
    (FusedConvTranspose1d, (4, 6, (3,)), {"stride": [2], "padding": (1,), "dilation": (1,), "groups": 1,
                                          "padding_mode": "zeros", "output_padding": (1,)}),
])
def test_layers_copied_from_templates_equal_constructed_ones(cls, args, kwargs):
    """Fused layers are copies of cached meta-device instances: the same attributes as constructing
    one, and no container shared between two copies."""
    from fxcanon.rewrite import _new_layer
    first, second, built = _new_layer(cls, *args, **kwargs), _new_layer(cls, *args, **kwargs), \
        cls(*args, **kwargs, device="meta")
    assert type(first) is cls and set(vars(first)) == set(vars(built))
    for key, value in vars(built).items():
        if key not in ("_parameters",):
            assert vars(first)[key] == value, key
        if isinstance(value, (dict, list, set)):
            assert vars(first)[key] is not vars(second)[key], key
    assert {k: (p.shape, p.is_meta) for k, p in first.named_parameters()} == \
        {k: (p.shape, p.is_meta) for k, p in built.named_parameters()}
