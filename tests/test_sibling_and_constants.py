"""Identity-branch BatchNorms folded into a sibling layer; BatchNorms of parameters alone precomputed."""

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxcanon import canonicalize, get_report
from fxcanon.equivalence import randomize_batchnorms, relative_error
from fxcanon.inventory import is_batchnorm_call
from fxcanon.report import IDENTITY_BRANCH, PRECOMPUTED

D = torch.float64


def batchnorm_calls(gm):
    return [n for n in gm.graph.nodes if is_batchnorm_call(gm, n)]


def assert_same(model, gm, *inputs, tol=1e-12):
    with torch.no_grad():
        assert relative_error(gm(*inputs), model(*inputs)) <= tol


class Branches(nn.Module):
    """``conv_bn(x) + bn(x) [+ pointwise(x)]``, the terms in a given order, summed with a given add."""

    def __init__(self, conv: nn.Module, bn: nn.Module, pointwise: nn.Module | None = None,
                 order: tuple[int, ...] = (0, 1, 2), add=operator.add, conv_bn: bool = True) -> None:
        super().__init__()
        self.conv, self.bn, self.pointwise, self.order, self.add = conv, bn, pointwise, order, add
        self.conv_bn = nn.BatchNorm2d(conv.out_channels) if conv_bn else nn.Identity()

    def forward(self, x):
        terms = [self.conv_bn(self.conv(x)), self.bn(x)]
        if self.pointwise is not None:
            terms.append(self.pointwise(x))
        terms = [terms[i] for i in self.order if i < len(terms)]
        total = terms[0]
        for term in terms[1:]:
            total = self.add(total, term)
        return total


@given(k=st.sampled_from([1, 3, 5]), dilation=st.integers(1, 2), per_group=st.integers(1, 3),
       groups=st.integers(1, 3), mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       pointwise=st.booleans(), order=st.permutations([0, 1, 2]), add=st.sampled_from([operator.add, torch.add]),
       bias=st.booleans(), batch=st.integers(1, 3), sizes=st.lists(st.integers(5, 9), min_size=2, max_size=2),
       seed=st.integers(0, 2**16))
def test_identity_branch_folds_into_the_sibling_conv_at_every_size(k, dilation, per_group, groups, mode, pointwise,
                                                                   order, add, bias, batch, sizes, seed):
    torch.manual_seed(seed)
    c = per_group * groups
    conv = nn.Conv2d(c, c, k, padding=dilation * (k - 1) // 2, dilation=dilation, groups=groups, bias=bias,
                     padding_mode=mode)
    model = randomize_batchnorms(Branches(conv, nn.BatchNorm2d(c), nn.Conv2d(c, c, 1) if pointwise else None,
                                          tuple(order), add)).eval().double()
    gm = canonicalize(model)
    assert not batchnorm_calls(gm)
    assert [f.rule for f in get_report(gm).entries["bn"].folds] == [IDENTITY_BRANCH]
    for h, w in (sizes, (sizes[1] + 1, sizes[0])):
        assert_same(model, gm, torch.randn(batch, c, h, w, dtype=D))


def test_identity_branch_folds_into_a_linear_with_a_rank_guard():
    model = randomize_batchnorms(Branches(nn.Linear(6, 6), nn.BatchNorm1d(6), conv_bn=False)).eval().double()
    gm = canonicalize(model)
    assert not batchnorm_calls(gm)
    assert get_report(gm).entries["bn"].guards
    assert_same(model, gm, torch.randn(4, 6, dtype=D))
    with pytest.raises(AssertionError, match="fxcanon: BatchNorm .* rank == 2"):
        gm(torch.randn(2, 6, 6, dtype=D))


def test_timm_style_identity_chain_with_zero_start_folds():
    """``out = 0 + bn(x); out += conv(x)`` (timm's MobileOne blocks), identity ops in between."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.drop, self.conv = nn.BatchNorm2d(4), nn.Dropout(), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            out = 0 + self.drop(self.bn(x))
            out += self.conv(x)
            return out

    model = randomize_batchnorms(Block()).eval().double()
    gm = canonicalize(model)
    assert not batchnorm_calls(gm)
    assert_same(model, gm, torch.randn(2, 4, 7, 5, dtype=D))


class Difference(nn.Module):
    """FastViT's ``x + (mixer(x) - norm(x))`` with ``norm(x) = 0 + bn(x)``, or ``bn(x) - conv(x)``."""

    def __init__(self, bn_first: bool = False):
        super().__init__()
        self.bn, self.conv, self.bn_first = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, groups=4), bn_first

    def forward(self, x):
        if self.bn_first:
            return self.bn(x) - self.conv(x)
        return x + (self.conv(x) - (0 + self.bn(x)))


def test_subtracted_identity_branch_folds_with_negated_scale_and_shift():
    model = randomize_batchnorms(Difference()).eval().double()
    gm = canonicalize(model)
    assert not batchnorm_calls(gm)
    assert_same(model, gm, torch.randn(2, 4, 6, 5, dtype=D))
    model = randomize_batchnorms(Difference(bn_first=True)).eval().double()
    gm = canonicalize(model)
    assert "subtracts another term from it" in get_report(gm).entries["bn"].left_reason
    assert_same(model, gm, torch.randn(2, 4, 6, 5, dtype=D))


@pytest.mark.parametrize("conv, x, reason", [
    (nn.Conv2d(4, 4, 1, stride=2), (2, 4, 1, 1), "stride"),
    (nn.Conv2d(4, 4, 2), None, "even kernel"),
    (nn.Conv2d(4, 4, 3, padding=(1, 0)), None, "padding (1, 0), not (1, 1)"),
    (nn.Conv2d(4, 4, 3, padding=2), None, "padding (2, 2), not (1, 1)"),
    (nn.Conv2d(4, 1, 3, padding=1), (2, 4, 5, 5), "maps 4 to 1 channels"),
    (nn.ConvTranspose2d(4, 4, 3, padding=1), (2, 4, 5, 5), "transposed"),
])
def test_misaligned_sibling_leaves_the_batchnorm_with_a_reason(conv, x, reason):
    model = randomize_batchnorms(Branches(conv, nn.BatchNorm2d(4), conv_bn=False)).eval().double()
    gm = canonicalize(model)
    entry = get_report(gm).entries["bn"]
    assert entry.status == "left" and reason in entry.left_reason, entry.left_reason
    if x is not None:
        assert_same(model, gm, torch.randn(x, dtype=D))


def test_sibling_reading_another_input_or_a_changed_input_stays():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x, y):
            return self.conv(y) + self.bn(x)

    class ChangedInput(TwoInputs):
        def forward(self, x, y):
            b = self.bn(x)
            x.relu_()
            return self.conv(x) + b

    for cls, reason in ((TwoInputs, "reads another input"), (ChangedInput, "in place")):
        model = randomize_batchnorms(cls()).eval().double()
        gm = canonicalize(model)
        assert reason in get_report(gm).entries["bn"].left_reason
        x, y = torch.randn(2, 2, 4, 5, 5, dtype=D)
        with torch.no_grad():
            assert relative_error(gm(x.clone(), y), model(x.clone(), y)) <= 1e-12


class StdConv(nn.Conv2d):
    """Weight standardization as in timm's ``StdConv2d``/``ScaledStdConv2d`` (``gain`` optional)."""

    def __init__(self, *args, gain: bool = True, mutate: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels) + 0.5) if gain else None
        self.mutate = mutate

    def forward(self, x):
        if self.mutate:
            self.weight.mul_(1.0)
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=None if self.gain is None else self.gain * 0.5, training=True, momentum=0.,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gain", [True, False])
def test_weight_standardization_is_precomputed_into_a_conv_layer(dtype, gain):
    model = nn.Sequential(StdConv(3, 8, 3, padding=1, gain=gain), nn.ReLU(),
                          StdConv(8, 4, 3, stride=2, groups=2, bias=False, gain=gain)).eval().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = canonicalize(model)
    assert not batchnorm_calls(gm)
    assert {f.rule for e in get_report(gm).entries.values() for f in e.folds} == {PRECOMPUTED}
    assert not get_report(gm).left
    assert sum(isinstance(m, nn.Conv2d) for m in gm.modules()) == 2
    x = torch.randn(2, 3, 9, 7, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ours = {p.data_ptr() for p in gm.parameters()}
    assert not ours & {p.data_ptr() for p in model.parameters()}


def test_weight_standardization_of_parameters_changed_in_place_stays():
    model = nn.Sequential(StdConv(3, 4, 3, mutate=True)).eval().double()
    gm = canonicalize(model)
    (entry,) = get_report(gm).left
    assert "in place" in entry.left_reason
    assert_same(model, gm, torch.randn(1, 3, 6, 6, dtype=D))


def test_training_mode_batchnorm_of_parameters_with_statistics_is_not_precomputed():
    class Updating(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.bn = nn.Parameter(torch.randn(3, 4)), nn.BatchNorm1d(4)

        def forward(self, x):
            return x @ F.batch_norm(self.w, self.bn.running_mean, self.bn.running_var, training=True)

    gm = canonicalize(Updating().eval(), allow_training=True)
    assert batchnorm_calls(gm) and get_report(gm).left


@pytest.mark.parametrize("name", ["repvgg_a0", "nf_resnet26"])
def test_timm_identity_branches_and_weight_standardization_fold(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_batchnorms(timm.create_model(name, pretrained=False)).eval().double()
    gm = canonicalize(model)
    assert not get_report(gm).left and not batchnorm_calls(gm)
    assert_same(model, gm, torch.randn(1, 3, 64, 48, dtype=D))


def test_identity_branch_and_precomputed_folds_survive_downstream_use():
    """channels_last inputs, deepcopy, torch.export, torch.compile(fullgraph=True) and a backward
    that leaves the caller's parameters without gradients."""
    conv = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
    model = randomize_batchnorms(nn.Sequential(StdConv(8, 8, 1, gain=True),
                                               Branches(conv, nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)))).eval().double()
    gm = canonicalize(model)
    rules = {f.rule for e in get_report(gm).entries.values() for f in e.folds}
    assert {IDENTITY_BRANCH, PRECOMPUTED} <= rules and not batchnorm_calls(gm)
    x = torch.randn(3, 8, 11, 6, dtype=torch.float64)
    assert_same(model, gm, x.contiguous(memory_format=torch.channels_last))
    assert_same(model, copy.deepcopy(gm), x)
    assert_same(model, torch.export.export(gm, (x,)).module(), x)
    torch._dynamo.reset()
    assert_same(model, torch.compile(gm, fullgraph=True, backend="eager"), x)
    gm(x.requires_grad_()).sum().backward()
    assert all(p.grad is None for p in model.parameters())
