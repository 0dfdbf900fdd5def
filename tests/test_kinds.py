"""Norm kinds declared as data (fxcanon.kinds): InstanceNorm with running statistics and
torch.native_batch_norm fold like BatchNorm; refusals are typed values."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxcanon import CanonizationError, canonicalize, get_report
from fxcanon.cli import run_one
from fxcanon.equivalence import check_equivalence
from fxcanon.report import NOT_AFTER_LAYER, NOT_BEFORE_LAYER, NOT_THROUGH_RELU, PER_SAMPLE_STATISTICS, UNREAD
from fxcanon.zoo import count_batchnorms

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def randomized(norm: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics (and affine parameters) for a norm with running statistics."""
    g = torch.Generator().manual_seed(seed)
    n = norm.num_features
    with torch.no_grad():
        norm.running_mean.copy_(torch.rand(n, generator=g) * 4 - 2)
        norm.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
        if norm.weight is not None:
            norm.weight.copy_(torch.rand(n, generator=g) * 4 - 2)
            norm.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
    return norm


def assert_exact(model, inputs, *checks):
    result = check_equivalence(model, inputs, [inputs, *checks])
    assert result.float64 <= 1e-10, result


@given(dims=st.sampled_from([1, 2, 3]), c_in=st.integers(1, 4), c_mid=st.integers(1, 4), kernel=st.integers(1, 3),
       padding=st.integers(0, 1), affine=st.booleans(), before=st.booleans(), batch=st.integers(1, 3),
       sizes=st.lists(st.integers(3, 6), min_size=2, max_size=2), seed=st.integers(0, 2**16))
def test_instance_norm_with_running_statistics_folds_exactly(dims, c_in, c_mid, kernel, padding, affine, before,
                                                             batch, sizes, seed):
    torch.manual_seed(seed)
    channels = c_in if before else c_mid
    norm = randomized(INSTANCE_NORM[dims](channels, affine=affine, track_running_stats=True), seed)
    conv = CONV[dims](c_in, c_mid, kernel, padding=padding)
    model = (nn.Sequential(norm, conv) if before else nn.Sequential(conv, norm)).eval()
    x = torch.randn(batch, c_in, *[sizes[0]] * dims)
    other = torch.randn(batch + 1, c_in, *[sizes[1]] * dims)
    unbatched = torch.randn(c_in, *[sizes[1]] * dims)  # InstanceNorm and ConvNd both take channels at dim 0
    assert_exact(model, (x,), (other,), (unbatched,))
    gm = canonicalize(model, (x,))
    assert not get_report(gm).left and count_batchnorms(gm) == 0
    assert count_batchnorms(torch.fx.symbolic_trace(model)) == 1


@pytest.mark.parametrize("spelling", ["functional", "aten"])
def test_functional_instance_norm_with_running_statistics_folds(spelling):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = randomized(nn.InstanceNorm2d(4, affine=True, track_running_stats=True))

        def forward(self, x):
            n = self.norm
            if spelling == "functional":
                return F.instance_norm(self.conv(x), n.running_mean, n.running_var, n.weight, n.bias,
                                       use_input_stats=False, eps=1e-3)
            return torch.instance_norm(self.conv(x), n.weight, n.bias, n.running_mean, n.running_var, False, 0.1,
                                       1e-3, False)

    model, x = Model().eval(), torch.randn(2, 3, 8, 8)
    assert_exact(model, (x,))
    assert not get_report(canonicalize(model, (x,))).left


def test_instance_norm_with_input_statistics_is_kept_and_not_counted():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.InstanceNorm2d(4, affine=True)
            self.tracked = randomized(nn.InstanceNorm2d(4, track_running_stats=True))

        def forward(self, x):
            y = self.norm(self.conv(x))
            t = self.tracked
            return F.instance_norm(y, t.running_mean, t.running_var) + F.instance_norm(y, use_input_stats=True)

    model, x = Model().eval(), torch.randn(2, 3, 8, 8)
    gm = canonicalize(model, (x,))
    report = get_report(gm)
    assert len(report.left) == 3 and all(e.refused(PER_SAMPLE_STATISTICS) for e in report.left)
    assert "statistics of each sample" in report.entries["norm"].left_reason
    assert count_batchnorms(gm) == 0
    torch.testing.assert_close(gm(x), model(x))


def test_instance_norm_whose_flag_was_switched_off_keeps_using_input_statistics():
    norm = randomized(nn.InstanceNorm2d(4, track_running_stats=True))
    norm.track_running_stats = False  # buffers stay; the module now normalizes each sample
    model = nn.Sequential(nn.Conv2d(3, 4, 1), norm).eval()
    x = torch.randn(2, 3, 5, 5)
    gm = canonicalize(model, (x,))
    assert get_report(gm).left[0].refused(PER_SAMPLE_STATISTICS)
    torch.testing.assert_close(gm(x), model(x))


def test_instance_norm_in_training_mode_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4, track_running_stats=True))
    with pytest.raises(CanonizationError, match="InstanceNorm '1' is in training mode"):
        canonicalize(model)


class NativeBatchNorm(nn.Module):
    def __init__(self, training=False, other_results=False, legit=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = randomized(nn.BatchNorm2d(4))
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1)
        self.training_flag, self.other_results, self.legit = training, other_results, legit

    def forward(self, x):
        b = self.bn
        if self.legit:
            out = torch._native_batch_norm_legit_no_training(self.conv(x), b.weight, b.bias, b.running_mean,
                                                             b.running_var, 0.1, 1e-5)
        else:
            out = torch.native_batch_norm(self.conv(x), b.weight, b.bias, b.running_mean, b.running_var,
                                          self.training_flag, 0.1, 1e-5)
        y = self.conv2(out[0])
        return y + out[1].sum() if self.other_results else y


@pytest.mark.parametrize("legit", [False, True])
def test_native_batch_norm_folds(legit):
    model, x = NativeBatchNorm(legit=legit).eval(), torch.randn(2, 3, 6, 6)
    assert_exact(model, (x,), (torch.randn(1, 3, 9, 7),))
    gm = canonicalize(model, (x,))
    report = get_report(gm)
    assert not report.left and len(report.entries) == 1 and count_batchnorms(gm) == 0
    assert "native_batch_norm(" not in gm.code


def test_native_batch_norm_whose_other_results_are_used_is_left_with_the_reason():
    model, x = NativeBatchNorm(other_results=True).eval(), torch.randn(2, 3, 6, 6)
    gm = canonicalize(model, (x,))
    (entry,) = get_report(gm).left
    assert entry.refused(UNREAD) and "other than the normalized tensor" in entry.left_reason
    assert count_batchnorms(gm) == 1
    torch.testing.assert_close(gm(x), model(x))


def test_native_batch_norm_in_training_mode_raises():
    with pytest.raises(CanonizationError, match="training mode"):
        canonicalize(NativeBatchNorm(training=True).eval())


def test_refusals_carry_codes_and_the_report_prints_their_messages():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = randomized(nn.BatchNorm2d(3))

        def forward(self, x):
            return torch.sigmoid(self.bn(x).relu())

    gm = canonicalize(Model().eval(), (torch.randn(1, 3, 4, 4),))
    entry = get_report(gm).entries["bn"]
    assert [r.code for r in entry.refusals] == [NOT_AFTER_LAYER, NOT_BEFORE_LAYER, NOT_THROUGH_RELU]
    assert entry.left_reason == "; ".join(str(r) for r in entry.refusals)
    assert entry.left_reason in str(get_report(gm))


def test_cli_keeps_instance_norms_with_input_statistics_out_of_its_exit_status(monkeypatch):
    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4),
                             nn.Conv2d(4, 4, 1), randomized(nn.InstanceNorm2d(4, track_running_stats=True)))

    monkeypatch.setattr("fxcanon.cli.build", lambda name, seed: build().eval())
    summary = run_one("model", 16, 1, lrp_form=False, check=True, seed=0)
    assert summary["left"] == {} and list(summary["kept"]) == ["_1"] and summary["equivalent"]
    assert summary["batchnorms_before"] == 1 and summary["batchnorms_after"] == 0


def test_backend_folds_instance_norm_with_running_statistics():
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    norm = randomized(nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(4, 2, 3)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(model, backend="fxcanon", options={"inner": inner})(x)
        torch.testing.assert_close(y, model(x), rtol=1e-12, atol=1e-12)
    assert graphs and not any(n.target is F.instance_norm for g in graphs for n in g.graph.nodes)
