"""BN -> ReLU -> linear layers (threshold activation, section 5) and explicit residual sums."""

import operator

import torch
from torch import nn

from fxcanon import canonicalize, get_report
from fxcanon.equivalence import check_equivalence, randomize_batchnorms, relative_error
from fxcanon.fold_math import relu_factorization
from fxcanon.modules import Sum, ThresholdReLU
from fxcanon.passes import FOLD_PASSES, ExplicitPooling, ExplicitSums
from fxcanon.report import THRESHOLD

D = torch.float64


def test_relu_factorization_every_sign_and_zero_scale():
    s = torch.tensor([2.0, -0.5, 0.0, 0.0], dtype=D)
    t = torch.tensor([0.3, 1.0, -2.0, 1.5], dtype=D)
    theta, sign, shift = relu_factorization(s, t)
    h = ThresholdReLU(theta, sign)
    x = torch.linspace(-3, 3, 61, dtype=D).reshape(-1, 1).expand(-1, 4)
    torch.testing.assert_close(s * h(x) + shift, torch.relu(s * x + t), rtol=0, atol=1e-14)


def test_threshold_gate_is_relus_gate():
    s, t = torch.tensor([1.5, -2.0], dtype=D), torch.tensor([0.2, 0.4], dtype=D)
    theta, sign, _ = relu_factorization(s, t)
    x = torch.randn(50, 2, dtype=D, requires_grad=True)
    ThresholdReLU(theta, sign)(x).sum().backward()
    assert torch.equal(x.grad != 0, s * x.detach() + t > 0)


class PreActivation(nn.Module):
    """BN -> ReLU shared by the shortcut and the main branch (pre-activation ResNet)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.main = nn.Conv2d(4, 6, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 6, 1, stride=1)

    def forward(self, x):
        y = torch.relu(self.bn(x))
        return self.main(y) + self.shortcut(y)


def test_pre_activation_block_folds_into_both_branches():
    model = randomize_batchnorms(PreActivation()).eval()
    with torch.no_grad():
        model.bn.weight[0] = 0.0
        model.bn.weight[1] *= -1
    x = torch.randn(2, 4, 5, 6)
    gm = canonicalize(model, (x,))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert sum(isinstance(m, ThresholdReLU) for m in gm.modules()) == 1
    folds = get_report(gm).entries["bn"].folds
    assert {f.into for f in folds} == {"main", "shortcut"} and {f.rule for f in folds} == {THRESHOLD}
    result = check_equivalence(model, (x,), [(x,), (torch.randn(1, 4, 2, 9),)])
    assert result.holds(), result


def test_relu_with_a_non_linear_user_keeps_the_batchnorm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = torch.relu(self.bn(x))
            return self.conv(y) * torch.sigmoid(y)

    model = randomize_batchnorms(Net()).eval()
    gm = canonicalize(model)
    assert "after its ReLU" in get_report(gm).entries["bn"].left_reason
    x = torch.randn(1, 3, 4, 4)
    assert relative_error(gm(x), model(x)) == 0


def test_sums_are_explicit_and_switchable():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            out = self.conv(x)
            out += x
            return torch.add(out, 1.0) + out.size(0)

    model = Block().eval()
    x = torch.randn(2, 3, 4, 4)
    gm = canonicalize(model)
    assert sum(isinstance(m, Sum) for m in gm.modules()) == 1
    assert torch.equal(gm(x), model(x))
    assert not any(isinstance(m, Sum) for m in canonicalize(model, passes=FOLD_PASSES).modules())


def test_inplace_add_whose_input_is_read_later_is_left():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    a, b = graph.call_function(operator.mul, (x, 2)), graph.call_function(operator.mul, (x, 3))
    c = graph.call_function(operator.iadd, (a, b))
    graph.output((c, graph.call_function(operator.neg, (a,))))
    gm = canonicalize(torch.fx.GraphModule(nn.Module(), graph), passes=[ExplicitSums])
    assert not any(isinstance(m, Sum) for m in gm.modules())


def test_broadcasting_sum_keeps_its_shape():
    class Net(nn.Module):
        def forward(self, x, y):
            return x.relu() + y.relu()

    inputs = (torch.randn(2, 3, 4), torch.randn(3, 1))
    gm = canonicalize(Net(), inputs, passes=[ExplicitSums])
    assert torch.equal(gm(*inputs), Net()(*inputs))


def test_sum_reductions_become_sum_modules():
    class Pool(nn.Module):
        def forward(self, x):
            return x.relu().sum(1) * torch.sum(x, dim=2, keepdim=True).sum((1, 2)).unsqueeze(1)

    x = torch.randn(2, 3, 4)
    gm = canonicalize(Pool(), (x,), passes=[ExplicitSums])
    assert sum(isinstance(m, Sum) for m in gm.modules()) == 1  # keepdim and several dims stay
    torch.testing.assert_close(gm(x), Pool()(x))


def test_models_holding_fxcanon_modules_trace_them_as_leaves():
    inner = canonicalize(randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))).eval())
    outer = nn.Sequential(inner, nn.ReLU())
    gm = canonicalize(outer)
    x = torch.randn(1, 3, 5, 5)
    assert relative_error(gm(x), outer(x)) < 1e-6


def test_functional_average_pools_become_modules():
    class Pools(nn.Module):
        def forward(self, x):
            y = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
            return nn.functional.adaptive_avg_pool2d(y, 1).flatten(1) + nn.functional.avg_pool1d(x.flatten(2), 2).sum(2)

    x = torch.randn(2, 3, 5, 6)
    gm = canonicalize(Pools(), (x,), passes=[ExplicitPooling])
    kinds = sorted(type(m).__name__ for m in gm.modules() if type(m).__module__ == "torch.nn.modules.pooling")
    assert kinds == ["AdaptiveAvgPool2d", "AvgPool1d", "AvgPool2d"]
    assert torch.equal(gm(x), Pools()(x))


def test_sums_equal_in_shape_only_at_the_traced_size_broadcast():
    class Net(nn.Module):
        def forward(self, x):
            return x.relu() + x.mean((2, 3), keepdim=True).relu()

    gm = canonicalize(Net(), (torch.randn(2, 3, 1, 1),), passes=[ExplicitSums])
    x = torch.randn(2, 3, 4, 4)
    assert sum(isinstance(m, Sum) for m in gm.modules()) == 1
    assert torch.equal(gm(x), Net()(x))
