"""register_layer / register_norm: a user's layer and norm types kept as leaves fold as their base kind."""

import pytest
import torch
from torch import nn
from torch.fx import GraphModule, Tracer
from torchvision.ops import FrozenBatchNorm2d

from fxcanon import canonicalize, get_report, register_layer, register_norm
from fxcanon.equivalence import check_equivalence
from fxcanon.modules import FusedConv2d, FusedLinear
from fxcanon.report import UNREAD
from fxcanon.zoo import count_batchnorms

from test_kinds import randomized


class LeafTracer(Tracer):
    """Keeps the types in ``leaves`` as leaf modules (symbolic_trace traces through modules defined
    outside torch.nn)."""

    def __init__(self, *leaves):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m, name):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, name)


def leaf_traced(model, *leaves):
    return GraphModule(model, LeafTracer(*leaves).trace(model))


class LoggedConv(nn.Conv2d):
    """A Conv2d subclass of a user's (same function)."""

    def forward(self, x):
        return super().forward(x)


class UnregisteredConv(LoggedConv):
    pass


class PlainLinear(nn.Module):
    """A layer of a user's with Linear's weight and bias semantics, not a subclass of nn.Linear."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return x @ self.weight.T + self.bias


class MyBatchNorm(nn.BatchNorm2d):
    pass


class UnregisteredBatchNorm(nn.BatchNorm2d):
    pass


def assert_exact(model, x, leaves):
    result = check_equivalence(model, (x,), canonize=lambda m, inputs: canonicalize(leaf_traced(m, *leaves), inputs))
    assert result.float64 <= 1e-10, result


def test_unregistered_leaf_layer_is_not_folded_into():
    model = nn.Sequential(UnregisteredConv(3, 4, 3), randomized(nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = canonicalize(leaf_traced(model, UnregisteredConv), (x,))
    assert "not a Linear/Conv/ConvTranspose layer" in get_report(gm).entries["_1"].left_reason


def test_registered_layer_subclass_is_folded_as_its_base_kind():
    register_layer(LoggedConv, like=nn.Conv2d)
    model = nn.Sequential(randomized(nn.BatchNorm2d(3)), LoggedConv(3, 4, 3, padding=1),
                          randomized(nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 6, 6)
    assert_exact(model, x, (LoggedConv,))
    gm = canonicalize(leaf_traced(model, LoggedConv), (x,))
    assert not get_report(gm).left and count_batchnorms(gm) == 0
    assert [type(m) for m in gm.modules() if isinstance(m, nn.Conv2d)] == [FusedConv2d]
    assert type(model[1]) is LoggedConv  # the caller's model is not changed


def test_registered_layer_of_the_users_own_is_folded():
    register_layer(PlainLinear, like=nn.Linear)
    model = nn.Sequential(PlainLinear(5, 3), randomized(nn.BatchNorm1d(3)), nn.ReLU(), PlainLinear(3, 2)).eval()
    model[1].eval()
    x = torch.randn(4, 5)
    assert_exact(model, x, (PlainLinear,))
    gm = canonicalize(leaf_traced(model, PlainLinear), (x,))
    assert not get_report(gm).left and isinstance(gm.get_submodule("0"), FusedLinear)


def test_registered_norm_subclass_is_folded():
    register_norm(MyBatchNorm, like=nn.BatchNorm2d)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomized(MyBatchNorm(4)), nn.Conv2d(4, 2, 1),
                          randomized(UnregisteredBatchNorm(2))).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = canonicalize(leaf_traced(model, MyBatchNorm, UnregisteredBatchNorm), (x,))
    report = get_report(gm)
    assert report.entries["_1"].status == "folded"
    (left,) = report.left
    assert left.refused(UNREAD) and "register_norm" in left.left_reason
    torch.testing.assert_close(gm(x), model(x))


def test_registered_frozen_batchnorm_is_folded():
    register_norm(FrozenBatchNorm2d, like=nn.BatchNorm2d)
    frozen = FrozenBatchNorm2d(4)
    with torch.no_grad():
        for buffer, (low, high) in zip((frozen.weight, frozen.bias, frozen.running_mean, frozen.running_var),
                                       ((0.5, 2), (-1, 1), (-1, 1), (0.2, 2))):
            buffer.uniform_(low, high)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), frozen).eval()
    x = torch.randn(2, 3, 6, 6)
    assert_exact(model, x, (FrozenBatchNorm2d,))
    gm = canonicalize(leaf_traced(model, FrozenBatchNorm2d), (x,))
    assert not get_report(gm).left and count_batchnorms(gm) == 0


def test_registering_an_unknown_base_kind_raises():
    with pytest.raises(ValueError, match="not a layer type"):
        register_layer(PlainLinear, like=nn.ReLU)
    with pytest.raises(ValueError, match="not a norm module type"):
        register_norm(MyBatchNorm, like=nn.LayerNorm)
