"""Each pass on its own and the default pipeline: graph shape, report and numerics (float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import symbolic_trace

from fxcanon import FusedConv2d, FusedLinear, canonicalize, get_report
from fxcanon.equivalence import relative_error
from fxcanon.passes import DEFAULT_PASSES, FoldBatchNormBackward, FoldBatchNormForward
from fxcanon.report import BACKWARD_BIAS_MAP, BACKWARD_VECTOR, FORWARD, THROUGH_LAYOUT

from models import BatchNormAct2d, FunctionalNet, random_bn

D = torch.float64


def batchnorm_nodes(gm):
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            found.append(node)
        if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
            found.append(node)
    return found


def assert_same(model, gm, *inputs, tol=1e-12):
    with torch.no_grad():
        assert relative_error(gm(*inputs), model(*inputs)) <= tol


def test_default_order_is_folds_then_explicit_modules():
    assert [p.__name__ for p in DEFAULT_PASSES] == [
        "PrecomputeParameterBatchNorms", "FoldBatchNormForward", "FoldBatchNormBackward", "FoldBatchNormThroughReLU",
        "FoldIdentityBranch", "ExplicitSums", "ExplicitGates", "ExplicitPooling"]


def test_forward_pass_alone_folds_conv_bn():
    model = random_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))).double()
    gm = canonicalize(model, passes=[FoldBatchNormForward])
    assert len(batchnorm_nodes(gm)) == 1
    report = get_report(gm)
    assert [f.rule for f in report.entries["_1"].folds] == [FORWARD]
    assert report.entries["_3"].status == "left"
    assert_same(model, gm, torch.randn(2, 3, 8, 8, dtype=D))


def test_backward_pass_alone_vector_and_bias_map():
    model = random_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                    nn.Conv2d(4, 2, 3, padding=1))).double()
    gm = canonicalize(model, passes=[FoldBatchNormBackward])
    assert not batchnorm_nodes(gm)
    rules = {k: [f.rule for f in e.folds] for k, e in get_report(gm).entries.items()}
    assert rules == {"_0": [BACKWARD_VECTOR], "_2": [BACKWARD_BIAS_MAP]}
    for size in (1, 2, 5, 8):
        assert_same(model, gm, torch.randn(2, 3, size + 2, size + 3, dtype=D))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_modes_keep_a_vector_bias(mode):
    model = random_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode))).double()
    gm = canonicalize(model)
    fused = gm.get_submodule("1")
    assert isinstance(fused, FusedConv2d) and not fused.has_bias_map
    assert_same(model, gm, torch.randn(2, 3, 6, 7, dtype=D))


def test_explicit_constant_pad_between_bn_and_conv():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv, self.pad = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.ConstantPad2d((2, 0, 1, 3), -0.3)

        def forward(self, x):
            return self.conv(F.pad(self.bn(x), (2, 0, 1, 3), value=0.75)) + self.conv(self.pad(self.bn(x)))

    model = random_bn(Net()).double()
    gm = canonicalize(model)
    assert not batchnorm_nodes(gm)
    for h, w in ((4, 4), (1, 2), (7, 5)):
        assert_same(model, gm, torch.randn(2, 3, h, w, dtype=D))


def test_functional_spellings_fold_with_shapes():
    model = random_bn(FunctionalNet()).double()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    gm = canonicalize(model, x)
    assert not batchnorm_nodes(gm)
    assert {type(m) for m in gm.modules()} >= {FusedConv2d, FusedLinear}
    assert_same(model, gm, x)
    assert_same(model, gm, torch.randn(3, 3, 9, 4, dtype=D))


def test_functional_batchnorm_without_shapes_folds_with_rank_guards():
    """A functional BatchNorm normalizes dim 1 at any rank: folded for the layer's rank, checked at call time."""
    model = random_bn(FunctionalNet()).double()
    gm = canonicalize(model)
    report = get_report(gm)
    assert not report.left and all(e.guards for e in report.entries.values())
    assert not batchnorm_nodes(gm)
    assert_same(model, gm, torch.randn(2, 3, 6, 6, dtype=D))


def test_timm_style_batchnorm_act_folds():
    model = random_bn(nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, bias=False), BatchNormAct2d(5),
                                    nn.Conv2d(5, 2, 1))).double()
    x = torch.randn(2, 3, 9, 9, dtype=D)
    gm = canonicalize(model, x)
    assert not batchnorm_nodes(gm)
    assert_same(model, gm, x)


def test_bn_with_several_linear_consumers_goes_into_each():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.a, self.b = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            y = self.bn(x)
            return self.a(y) + self.b(y)

    model = random_bn(Net()).double()
    gm = canonicalize(model)
    assert not batchnorm_nodes(gm)
    assert sorted(f.into for f in get_report(gm).entries["bn"].folds) == ["a", "b"]
    assert_same(model, gm, torch.randn(2, 3, 5, 5, dtype=D))


def test_bn_stays_for_a_non_linear_consumer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            y = self.bn(x)
            return self.conv(y), torch.sigmoid(y)

    model = random_bn(Net()).double()
    gm = canonicalize(model)
    entry = get_report(gm).entries["bn"]
    assert entry.status == "partly folded" and "sigmoid" in entry.left_reason
    assert len(batchnorm_nodes(gm)) == 1
    assert_same(model, gm, torch.randn(2, 3, 5, 5, dtype=D))


def test_producer_with_other_users_is_not_folded_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(self.bn(y)) + y

    model = random_bn(Net()).double()
    gm = canonicalize(model)
    assert "other users" in get_report(gm).entries["bn"].left_reason
    assert_same(model, gm, torch.randn(2, 3, 5, 5, dtype=D))


def test_shared_conv_is_folded_into_a_copy_per_call_site():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(torch.relu(self.bn(self.conv(x))))

    model = random_bn(Net()).double()
    gm = canonicalize(model)
    assert not batchnorm_nodes(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(set(targets)) == 2  # two call sites, two different layers
    assert_same(model, gm, torch.randn(2, 3, 6, 6, dtype=D))


def test_linear_bn_and_bn_linear_with_shapes():
    model = random_bn(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6),
                                    nn.Linear(6, 3))).double()
    x = torch.randn(4, 5, dtype=D)
    gm = canonicalize(model, x)
    assert not batchnorm_nodes(gm)
    assert_same(model, gm, x)


def test_bn1d_on_sequences_is_not_folded_into_a_linear_over_the_last_axis():
    model = random_bn(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))).double()
    x = torch.randn(3, 4, 4, dtype=D)  # (N, C, L) with L == C: the Linear acts on L, not on C
    gm = canonicalize(model, x)
    assert len(batchnorm_nodes(gm)) == 1
    assert_same(model, gm, x)


def test_forward_fold_into_a_layer_that_already_has_a_bias_map():
    model = random_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1),
                                    nn.BatchNorm2d(4))).double()
    gm = canonicalize(model, passes=[FoldBatchNormBackward, FoldBatchNormForward])
    assert not batchnorm_nodes(gm)
    assert_same(model, gm, torch.randn(2, 3, 4, 6, dtype=D))


def test_chained_batchnorms_before_a_padded_conv():
    model = random_bn(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=2))).double()
    gm = canonicalize(model)
    assert not batchnorm_nodes(gm)
    assert_same(model, gm, torch.randn(2, 3, 3, 5, dtype=D))


def test_conv_transpose_groups_both_directions():
    model = random_bn(nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                                    nn.BatchNorm2d(6))).double()
    gm = canonicalize(model)
    assert not batchnorm_nodes(gm)
    for size in (1, 3, 4):
        assert_same(model, gm, torch.randn(2, 4, size, size + 1, dtype=D))


def test_conv_transpose_output_size_argument():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.up = nn.BatchNorm2d(2), nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(self.bn(x), output_size=[x.size(2) * 2, x.size(3) * 2])

    model = random_bn(Net()).double()
    gm = canonicalize(model)
    assert not batchnorm_nodes(gm)
    assert_same(model, gm, torch.randn(2, 2, 4, 5, dtype=D))


def test_report_table_mentions_every_batchnorm():
    model = random_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sigmoid(), nn.BatchNorm2d(4)))
    text = str(get_report(canonicalize(model)))
    assert "forward" in text and "_3" in text and "left" in text


def test_passes_are_pass_infra_passes_usable_directly():
    model = random_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).double()
    gm = symbolic_trace(copy.deepcopy(model))
    result = FoldBatchNormForward()(gm)
    assert result.modified and not batchnorm_nodes(result.graph_module)
    assert_same(model, result.graph_module, torch.randn(1, 3, 5, 5, dtype=D))


def test_a_pass_used_again_sees_a_batchnorm_added_since():
    """A pass instance remembers which calls are no norm: a BatchNorm module added to the graph
    module between two calls is still found and folded."""
    gm = symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).double())
    fold = FoldBatchNormForward()
    assert not fold(gm).modified
    gm.add_submodule("bn", random_bn(nn.Sequential(nn.BatchNorm2d(4)))[0].double().eval())
    conv = next(n for n in gm.graph.nodes if n.target == "0")
    with gm.graph.inserting_after(conv):
        bn = gm.graph.call_module("bn", (conv,))
    conv.replace_all_uses_with(bn, delete_user_cb=lambda user: user is not bn)
    gm.recompile()
    model = copy.deepcopy(gm)
    assert fold(gm).modified and not batchnorm_nodes(gm)
    assert_same(model, gm, torch.randn(2, 3, 6, 6, dtype=D))


def test_through_layout_rule_is_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm2d(3), nn.Linear(3 * 4 + 2, 2)

        def forward(self, x, extra):
            return self.fc(torch.cat([self.bn(x).flatten(1), extra], 1))

    model = random_bn(Net()).double()
    inputs = (torch.randn(2, 3, 2, 2, dtype=D), torch.randn(2, 2, dtype=D))
    gm = canonicalize(model, inputs)
    fold, = get_report(gm).entries["bn"].folds
    assert fold.rule == THROUGH_LAYOUT and fold.path == ("flatten", "cat")
    assert torch.equal(gm.fc.weight[:, 12:], model.fc.weight[:, 12:])
    assert_same(model, gm, *inputs)


class MixedConv(nn.Module):
    """MixNet's mixed convolution: channel groups through different kernels, concatenated, one BatchNorm."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 2, 5, padding=2, bias=False),
                                    nn.ConvTranspose2d(2, 1, 1)])
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        parts = [x[:, 2 * i:2 * i + 2] for i in range(3)]
        return self.bn(torch.cat([conv(part) for conv, part in zip(self.convs, parts)], 1))


def test_batchnorm_of_a_channel_concatenation_folds_slice_by_slice():
    model = random_bn(MixedConv()).double()
    gm = canonicalize(model)
    assert not get_report(gm).left and len(get_report(gm).entries["bn"].folds) == 3
    assert not batchnorm_nodes(gm)
    for shape in [(2, 6, 5, 5), (1, 6, 3, 8)]:
        assert_same(model, gm, torch.randn(shape, dtype=D))
