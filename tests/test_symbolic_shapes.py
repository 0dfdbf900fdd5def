"""Folds through layout ops proven for every input size: no example inputs, sizes never seen.

Without example inputs, shapes are recorded at inputs made from the graph and the sizes that
vary are followed symbolically (``fxcanon.shapes``); the folds need no size guard and must hold,
against the float64 original, at batches and resolutions never traced.
"""

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.fx import symbolic_trace

from fxcanon import canonicalize, get_report
from fxcanon.equivalence import check_equivalence, randomize_batchnorms, relative_error
from fxcanon.errors import CanonizationError
from fxcanon.models import RelationNetwork
from fxcanon.shapes import HINTED_KEY, SymbolicCone, record_hint_shapes, record_shapes
from fxcanon.zoo import MIN_SIZE, ZOO, build, count_batchnorms

D = torch.float64
FAST = {"densenet121", "resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"}


def _without_inputs(model, _inputs):
    return canonicalize(symbolic_trace(model))


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(ZOO)])
def test_zoo_without_example_inputs_folds_everything_at_every_size(name):
    model = build(name)
    gm = canonicalize(symbolic_trace(model))
    assert count_batchnorms(gm) == 0, get_report(gm).left
    assert not any(entry.guards for entry in get_report(gm).entries.values())
    side = max(32, MIN_SIZE.get(name, 0))
    checks = [(torch.randn(1, 3, side, side),), (torch.randn(3, 3, side + 8, side + 24),)]
    result = check_equivalence(model, checks[0], checks, canonize=_without_inputs)
    assert result.float64 <= 1e-9 and result.holds(float64_tolerance=1e-9), result


class Reshaped(nn.Module):
    """BatchNorm -> optional adaptive pooling -> a reshape -> Linear (features ``in_features``)."""

    def __init__(self, reshape, pool=None, in_features=4):
        super().__init__()
        self.bn, self.pool, self.reshape = nn.BatchNorm2d(4), pool, reshape
        self.fc = nn.Linear(in_features, 3)

    def forward(self, x):
        y = self.bn(x)
        if self.pool is not None:
            y = self.pool(y)
        return self.fc(self.reshape(y))


def _prepared(model):
    return randomize_batchnorms(model).eval().double()


def _assert_same(model, gm, shapes):
    for shape in shapes:
        x = torch.randn(shape, dtype=D)
        with torch.no_grad():
            assert relative_error(gm(x), model(x)) < 1e-12


FOLDING = {  # the channel reaches the same column at every size
    "vgg_flatten_after_pool": (lambda y: y.view(y.size(0), y.size(1) * y.size(2) * y.size(3)),
                               nn.AdaptiveAvgPool2d((2, 3)), 24),
    "pool_then_flatten": (lambda y: torch.flatten(y, 1), nn.AdaptiveAvgPool2d(1), 4),
    "channels_last_rows": (lambda y: y.permute(0, 2, 3, 1).reshape(-1, y.size(1)), None, 4),
    "mean": (lambda y: y.mean((2, 3)), None, 4),
}
REFUSED = {  # the column a channel reaches depends on the size
    "flatten_channels_with_space": (lambda y: y.view(y.size(0), -1), None, 16),
    "view_minus_one_channels": (lambda y: y.reshape(-1, 4), None, 4),
    "scrambled_view": (lambda y: y.view(y.size(0), y.size(2), y.size(1), y.size(3)).permute(0, 1, 3, 2).flatten(0, 2),
                       None, 4),
    "size_dependent_narrow": (lambda y: y.narrow(1, y.size(2) % 2, 2).flatten(2).mean(2), None, 2),
    "squeezed_batch": (lambda y: y.squeeze(0).mean((-2, -1)), None, 4),
}


@functools.cache
def _canonized(name):
    model = _prepared(Reshaped(*FOLDING[name]))
    return model, canonicalize(symbolic_trace(model))


@pytest.mark.parametrize("name", FOLDING)
def test_reshapes_that_keep_channels_apart_fold_without_guard(name):
    _, gm = _canonized(name)
    assert not get_report(gm).left and not get_report(gm).entries["bn"].guards, get_report(gm)


@pytest.mark.parametrize("name", FOLDING)
def test_cones_fold_from_a_seed_of_the_batchnorms_output_alone(name):
    """No whole-model run: the BatchNorm's output at sizes of its own feeds the cone, whose shapes
    are forgotten afterwards."""
    _, gm = _canonized(name)
    assert HINTED_KEY not in gm.meta
    assert not any("tensor_meta" in node.meta for node in gm.graph.nodes)


class JoinedOutside(nn.Module):
    """The BatchNorm's output joins a tensor from outside its cone: its shape needs the model run."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(torch.cat([self.bn(x), x[:, :1]], 1).mean((2, 3)))


def test_cones_joining_outside_tensors_record_shapes_from_the_model():
    model = _prepared(JoinedOutside())
    gm = canonicalize(symbolic_trace(model))
    assert gm.meta[HINTED_KEY] and count_batchnorms(gm) == 0 and not get_report(gm).entries["bn"].guards
    _assert_same(model, gm, [(1, 4, 3, 5), (2, 4, 8, 8)])


@given(st.sampled_from(sorted(FOLDING)), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9))
def test_reshape_folds_hold_at_any_size(name, batch, height, width):
    model, gm = _canonized(name)
    _assert_same(model, gm, [(batch, 4, height, width)])


@pytest.mark.parametrize("with_inputs", [False, True])
@pytest.mark.parametrize("name", REFUSED)
def test_reshapes_whose_columns_depend_on_the_size_are_refused_or_guarded(name, with_inputs):
    model = _prepared(Reshaped(*REFUSED[name]))
    example = (torch.randn(2, 4, 4, 1, dtype=D),) if with_inputs else None
    gm = canonicalize(model if with_inputs else symbolic_trace(model), example)
    entry = get_report(gm).entries["bn"]
    assert entry.left_reason or entry.guards, entry
    _assert_same(model, gm, [(2, 4, 4, 1)])
    x = torch.randn(3, 4, 2, 2, dtype=D)
    with torch.no_grad():
        expected = model(x)
        try:
            assert relative_error(gm(x), expected) < 1e-12
        except AssertionError as error:  # a guard refuses the sizes the fold was not proven for
            assert entry.guards and "fxcanon" in str(error)


def test_inputs_made_from_the_graph():
    """The image reaches a Conv2d with 3 input channels, the question an Embedding; the unpadded
    Relation Network accepts 128 but not 64 pixels."""
    gm = symbolic_trace(RelationNetwork(padding=0).eval())
    assert record_hint_shapes(gm)
    image, question = (n.meta["tensor_meta"] for n in gm.graph.nodes if n.op == "placeholder")
    assert tuple(image.shape) == (2, 3, 128, 128) and image.dtype == torch.float32
    assert tuple(question.shape) == (2, 8) and question.dtype == torch.long


def test_symbolic_sizes_of_the_relation_network_cone():
    """Batch and grid sides vary; the object count is fixed by the coordinate buffer (64), the pair
    features by the first relation layer g.0."""
    rn = RelationNetwork(padding=1).eval()
    gm = symbolic_trace(rn)
    record_shapes(gm, rn.example_inputs())
    nodes = {n.name: n for n in gm.graph.nodes}
    cone = SymbolicCone(gm, nodes["encoder_11"], [nodes[name] for name in ("cat_1", "view_3", "g_0")])
    assert cone.varying(nodes["encoder_11"]) == (True, False, True, True)
    assert cone.varying(nodes["cat_1"]) == (True, False, False, False)
    assert cone.varying(nodes["view_3"]) == (True, False)


class _Pooled(nn.Module):
    def __init__(self, output_size, functional):
        super().__init__()
        self.bn, self.output_size, self.functional = nn.BatchNorm2d(8), output_size, functional
        self.pool = nn.AdaptiveAvgPool2d(output_size)

    def forward(self, x):
        x = torch.relu(self.bn(x))
        return nn.functional.adaptive_avg_pool2d(x, self.output_size) if self.functional else self.pool(x)


def _cones_with_and_without_size_rules(monkeypatch, model):
    """The symbolic run from ``model.bn`` to the model's result, with size rules and running every op."""
    import fxcanon.shapes as shapes
    gm = symbolic_trace(model.eval())
    record_shapes(gm, (torch.randn(2, 8, 9, 7),))
    nodes = list(gm.graph.nodes)
    start, last = next(n for n in nodes if n.target == "bn"), nodes[-2]
    cones = [SymbolicCone(gm, start, [last])]
    monkeypatch.setattr(shapes, "_SIZE_RULES", ())
    return (*cones, SymbolicCone(gm, start, [last])), last


@pytest.mark.parametrize("output_size, functional", [((3, 2), True), (4, False), ((None, 2), True), ((None, 2), False)])
def test_adaptive_average_pooling_takes_its_size_rule(monkeypatch, output_size, functional):
    """Pooling to a size given in full is not run on symbolic sizes but given its result's sizes:
    the same as running it (and run where the size is not given in full)."""
    cones, pooled = _cones_with_and_without_size_rules(monkeypatch, _Pooled(output_size, functional))
    assert [c.sizes(pooled) for c in cones] == [cones[1].sizes(pooled)] * 2
    assert cones[0].varying(pooled) == (True, False, output_size[0] is None if isinstance(output_size, tuple)
                                        else False, False)


class _Flattened(nn.Module):
    def __init__(self, spelling, dims, pool):
        super().__init__()
        self.bn, self.spelling, self.dims, self.pool = nn.BatchNorm2d(8), spelling, dims, pool
        self.flatten = nn.Flatten(*dims)

    def forward(self, x):
        x = torch.relu(self.bn(x))
        if self.pool:
            x = nn.functional.adaptive_avg_pool2d(x, 1)
        if self.spelling == "function":
            return torch.flatten(x, *self.dims)
        return x.flatten(*self.dims) if self.spelling == "method" else self.flatten(x)


@pytest.mark.parametrize("spelling", ["function", "method", "module"])
@pytest.mark.parametrize("dims, pool", [((1, -1), True), ((1, -1), False), ((0, 2), False), ((-2, -1), False),
                                        ((2, 2), False), ((-4, 0), True)])
def test_flatten_takes_its_size_rule(monkeypatch, spelling, dims, pool):
    """Flatten is not run on symbolic sizes but given its result's sizes: the same sizes as running it."""
    from fxcanon.shapes import _Sizes
    cones, flat = _cones_with_and_without_size_rules(monkeypatch, _Flattened(spelling, dims, pool))
    assert cones[0].sizes(flat) == cones[1].sizes(flat)
    assert cones[0].varying(flat) == cones[1].varying(flat)
    assert isinstance(cones[0].values[flat], _Sizes) and isinstance(cones[1].values[flat], torch.Tensor)


def test_flatten_with_dims_out_of_order_fails_as_the_op_does():
    gm = symbolic_trace(_Flattened("function", (1, -1), False).eval())
    record_shapes(gm, (torch.randn(2, 8, 3, 3),))
    nodes = list(gm.graph.nodes)
    start, flat = next(n for n in nodes if n.target == "bn"), nodes[-2]
    flat.args = (flat.args[0], 2, 1)
    with pytest.raises(CanonizationError, match="start_dim"):
        SymbolicCone(gm, start, [flat])
