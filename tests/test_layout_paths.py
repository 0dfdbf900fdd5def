"""BatchNorm -> layout ops / concatenation -> Linear or Conv (section 4, A.21-A.26).

Hypothesis builds small networks from templates with random sizes and statistics; positive
templates must lose their BatchNorm and stay exact, negative ones must keep it and stay exact.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxcanon import canonicalize, get_report
from fxcanon.equivalence import check_equivalence, randomize_batchnorms, relative_error
from fxcanon.report import THRESHOLD, THROUGH_LAYOUT


def _flatten(y, e):
    return y.flatten(1)


def _channels_last_rows(y, e):
    return y.permute(0, 2, 3, 1).reshape(-1, y.size(1))


def _concat_features(y, e):
    rows = y.permute(0, 2, 3, 1)
    extra = e.permute(0, 2, 3, 1)
    return torch.cat([extra, rows, extra], 3).view(-1, rows.size(3) + 2 * extra.size(3))


def _pooled(y, e):
    return F.adaptive_avg_pool2d(F.avg_pool2d(y, 2, ceil_mode=True), 1).flatten(1)


def _mean(y, e):
    return y.mean((2, 3))


def _pairs(y, e):
    objects = y.flatten(2).transpose(1, 2)
    p = objects.size(1)
    return torch.cat([objects.unsqueeze(2).repeat(1, 1, p, 1), objects.unsqueeze(1).expand(-1, p, -1, -1)], 3)


def _transpose_twice(y, e):
    return y.transpose(1, 3).contiguous().transpose(1, 3)


def _channel_concat(y, e):
    return torch.cat([e, y], 1)


def _chunk(y, e):
    a, b = y.chunk(2, 1)
    return torch.cat([b, e, a], 1)


def _narrow_rows(y, e):
    return y[:, :, 1:, :].narrow(3, 0, y.size(3) - 1)


def _max_pool(y, e):
    return F.max_pool2d(y, 2, ceil_mode=True).flatten(1)


def _relu(y, e):
    return torch.relu(y).flatten(1)


def _sigmoid(y, e):
    return torch.sigmoid(y).flatten(1)


# template -> consumer kind
POSITIVE = {_flatten: "linear", _channels_last_rows: "linear", _concat_features: "linear", _pooled: "linear",
            _mean: "linear", _pairs: "linear", _transpose_twice: "conv", _channel_concat: "conv", _chunk: "conv",
            _narrow_rows: "conv", _relu: "linear"}


def _batch_concat(y, e):
    return torch.cat([y, e[:, : y.size(1)]], 0).flatten(1)


def _spatial_sum(y, e):
    return y.sum((2, 3))


def _zero_padded_average(y, e):
    return F.avg_pool2d(y, 3, stride=1, padding=1).flatten(1)


def _added(y, e):
    return (y + e[:, : y.size(1)]).flatten(1)


NEGATIVE = {_sigmoid: "linear", _batch_concat: "linear", _spatial_sum: "linear", _zero_padded_average: "linear",
            _added: "linear"}


class LayoutNet(nn.Module):
    def __init__(self, template, consumer, channels, extra, height, width):
        super().__init__()
        self.template = template
        self.bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            shape = template(torch.zeros(2, channels, height, width), torch.zeros(2, extra, height, width)).shape
        self.head = nn.Linear(shape[-1], 3) if consumer == "linear" else nn.Conv2d(shape[1], 3, 3, padding=1)

    def forward(self, x, e):
        return self.head(self.template(self.bn(x), e))


@st.composite
def layout_cases(draw, templates):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    template = draw(st.sampled_from(sorted(templates, key=lambda f: f.__name__)))
    channels = 2 * draw(st.integers(1, 3))
    extra = draw(st.integers(channels, channels + 2))
    height, width = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    model = LayoutNet(template, templates[template], channels, extra, height, width)
    randomize_batchnorms(model, draw(st.integers(0, 1000)))
    if draw(st.booleans()):
        with torch.no_grad():
            model.bn.weight.mul_(-1)  # negative scales: max pooling must then refuse
    model.eval()
    batch = draw(st.integers(1, 3))
    inputs = (torch.randn(batch, channels, height, width), torch.randn(batch, extra, height, width))
    return model, inputs


def _batchnorms_left(gm):
    return [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]


@given(layout_cases(POSITIVE))
def test_layout_paths_fold_exactly(case):
    model, inputs = case
    gm = canonicalize(model, inputs)
    assert not _batchnorms_left(gm), get_report(gm)
    fold, = get_report(gm).entries["bn"].folds
    assert fold.rule == (THRESHOLD if model.template is _relu else THROUGH_LAYOUT) and fold.path
    bigger = tuple(torch.randn(x.shape[0] + 1, *x.shape[1:]) for x in inputs)
    result = check_equivalence(model, inputs, [inputs, bigger])
    assert result.holds(), result


@given(layout_cases(NEGATIVE | {_max_pool: "linear"}))
def test_non_affine_paths_keep_the_batchnorm(case):
    model, inputs = case
    gm = canonicalize(model, inputs)
    negative_scale = bool((model.bn.weight < 0).any())
    if model.template is not _max_pool or negative_scale:
        assert _batchnorms_left(gm), get_report(gm)
        assert get_report(gm).entries["bn"].left_reason
    result = check_equivalence(model, inputs)
    assert result.holds(), result


def test_untouched_columns_are_bit_identical():
    model = randomize_batchnorms(LayoutNet(_concat_features, "linear", 4, 5, 3, 3)).eval()
    inputs = (torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3))
    gm = canonicalize(model, inputs)
    assert torch.equal(gm.head.weight[:, :5], model.head.weight[:, :5])
    assert torch.equal(gm.head.weight[:, 9:], model.head.weight[:, 9:])
    assert not torch.equal(gm.head.weight[:, 5:9], model.head.weight[:, 5:9])


def test_layout_paths_need_example_inputs_and_say_so():
    model = randomize_batchnorms(LayoutNet(_flatten, "linear", 2, 2, 2, 2)).eval()
    entry = get_report(canonicalize(model)).entries["bn"]
    assert entry.status == "left" and "example_inputs" in entry.left_reason


def test_a_view_that_keeps_channels_only_at_the_traced_size_is_guarded():
    """(N, C, 1, 1).view(-1, C) keeps channels in columns only while the map is 1x1: the model
    accepts 2x2 maps too (rows then mix channels), so the fold holds the map size."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.bn(x).view(-1, 4))

    model = randomize_batchnorms(Net()).eval().double()
    gm = canonicalize(model, (torch.randn(2, 4, 1, 1, dtype=torch.float64),))
    assert get_report(gm).entries["bn"].guards == [
        "input rank == 4, dim 2 == 1, dim 3 == 1 (features were followed through layout ops at these sizes only)"]
    x = torch.randn(5, 4, 1, 1, dtype=torch.float64)
    assert relative_error(gm(x), model(x)) < 1e-12
    with pytest.raises(AssertionError, match="fxcanon"):
        gm(torch.randn(2, 4, 2, 2, dtype=torch.float64))


class PerChannelOp(nn.Module):
    """BatchNorm -> an op that moves, copies or averages within channels -> conv."""

    def __init__(self, op, out_channels=4):
        super().__init__()
        self.bn, self.op, self.conv = nn.BatchNorm2d(4), op, nn.Conv2d(out_channels, 3, 3, padding=1)
        self.register_buffer("index", torch.tensor([3, 0, 0, 2]))

    def forward(self, x):
        y = self.bn(x)
        y = torch.index_select(y, 1, self.index) if self.op == "index_select" else self.op(y)
        return self.conv(y)


PER_CHANNEL_OPS = {
    "flip": (lambda y: torch.flip(y, (2,)), 4),
    "roll": (lambda y: y.roll(1, 3), 4),
    "index_select": ("index_select", 4),
    "pixel_unshuffle": (nn.PixelUnshuffle(2), 16),
    "nearest": (nn.Upsample(scale_factor=2), 4),
    "bilinear": (lambda y: F.interpolate(y, scale_factor=1.5, mode="bilinear"), 4),
    "bicubic": (lambda y: F.interpolate(y, size=(5, 7), mode="bicubic", align_corners=True), 4),
}


@pytest.mark.parametrize("name", PER_CHANNEL_OPS)
def test_per_channel_linear_ops_carry_the_fold(name):
    op, channels = PER_CHANNEL_OPS[name]
    model = randomize_batchnorms(PerChannelOp(op, channels)).eval().double()
    gm = canonicalize(model, torch.randn(2, 4, 4, 6, dtype=torch.float64))
    assert not get_report(gm).left, get_report(gm)
    for shape in [(2, 4, 4, 6), (3, 4, 6, 8), (1, 4, 2, 2)]:
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            assert relative_error(gm(x), model(x)) < 1e-12
