"""torch.compile(model, backend="fxcanon"): folds inside Dynamo graphs, never stale."""

import functools
import operator
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import fxcanon  # noqa: F401  (registers the backend; the entry point does it without the import)
from fxcanon.equivalence import randomize_batchnorms, relative_error
from fxcanon.zoo import build
from models import EditedOutput, SideBranchReLU
from test_properties import conv_models, runs

BATCH_NORMS = (F.batch_norm, torch.batch_norm, torch.ops.aten.batch_norm.default)


class Recorder:
    """An inner compiler that keeps the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def batchnorms(self):
        return [n for g in self.graphs for n in g.graph.nodes if n.target in BATCH_NORMS]


def compiled(model, recorder=None, inner="eager"):
    torch._dynamo.reset()
    return torch.compile(model, backend="fxcanon", options={"inner": recorder or inner})


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0"])
def test_no_batchnorm_reaches_the_inner_compiler(name):
    model = build(name)
    recorder = Recorder()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y32 = compiled(model, recorder)(x)
        expected = model.double()(x.double())
        base = relative_error(model.float()(x), expected)
        y64 = compiled(model.double(), Recorder())(x.double())
    assert recorder.graphs and not recorder.batchnorms()
    assert relative_error(y64, expected) < 1e-10
    assert relative_error(y32, expected) <= 2 * base + 8 * torch.finfo(torch.float32).eps


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn2, self.conv2 = nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn2(torch.relu(self.bn1(self.conv1(x)))))


def block(seed):
    torch.manual_seed(seed)
    return randomize_batchnorms(Block(), seed).eval()


def test_two_instances_share_one_compiled_graph_and_both_are_right():
    a, b = block(1), block(2)
    recorder = Recorder()
    torch._dynamo.reset()
    ca = torch.compile(a, backend="fxcanon", options={"inner": recorder})
    cb = torch.compile(b, backend="fxcanon", options={"inner": recorder})
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert relative_error(ca(x), a(x)) < 1e-5
        assert relative_error(cb(x), b(x)) < 1e-5
    assert len(recorder.graphs) == 1 and not recorder.batchnorms()


def test_load_state_dict_after_compilation_is_seen():
    model = block(1)
    fast = compiled(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        fast(x)
        model.load_state_dict(block(7).state_dict())
        model.bn2.running_var.mul_(3.0)  # and in-place updates
        assert relative_error(fast(x), model(x)) < 1e-5
        model.conv1.weight.mul_(-2.0)
        fast(x)
        assert relative_error(fast(x), model(x)) < 1e-5


def test_cached_folds_under_inference_mode_and_autograd():
    model = block(5)
    fast = compiled(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        fast(x)
        assert relative_error(fast(x), model(x)) < 1e-5
    for p in model.parameters():
        p.requires_grad_(False)
    x.requires_grad_(True)
    fast(x).sum().backward()  # cached fold outputs feed an autograd graph
    assert x.grad is not None


def test_training_graph_is_untouched():
    model = block(1).train()
    recorder = Recorder()
    x = torch.randn(4, 3, 6, 6)
    reference = block(1).train()
    y = compiled(model, recorder)(x)
    assert len(recorder.batchnorms()) == 2
    torch.testing.assert_close(y, reference(x))
    torch.testing.assert_close(model.bn1.running_mean, reference.bn1.running_mean)


def test_bias_map_follows_the_input_size():
    model = block(3).double()
    recorder = Recorder()
    fast = compiled(model, recorder)
    with torch.no_grad():
        for size in ((5, 7), (9, 4), (1, 1)):
            x = torch.randn(2, 3, *size, dtype=torch.float64)
            assert relative_error(fast(x), model(x)) < 1e-12
    assert len(recorder.graphs) >= 2 and not recorder.batchnorms()  # the dynamic-shape graph is folded too


def test_inductor_inner_compiler():
    model = block(4)
    fast = compiled(model, inner="inductor")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert relative_error(fast(x), model(x)) < 1e-5


def test_backend_name_works_without_importing_fxcanon():
    code = textwrap.dedent("""
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        x = torch.randn(1, 3, 5, 5)
        y = torch.compile(model, backend="fxcanon")(x)
        torch.testing.assert_close(y, model(x))
        assert "fxcanon.backend" in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=12)
@given(case=conv_models())
def test_backend_folds_random_layers_exactly(case):
    model, inputs = case
    assume(runs(model, inputs))
    model = model.double()
    recorder = Recorder()
    torch._dynamo.reset()
    fast = torch.compile(model, backend="fxcanon", options={"inner": recorder}, dynamic=False)
    with torch.no_grad():
        for (x,) in inputs:
            assert relative_error(fast(x.double()), model(x.double())) < 1e-10
    assert not recorder.batchnorms()


def test_explicit_constant_padding_is_left_in_graphs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return self.conv(F.pad(self.bn(x), (1, 1, 1, 1), value=0.5))

    model = randomize_batchnorms(Net()).eval().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(compiled(model)(x), model(x)) < 1e-12


# in-place spellings as they reach the backend: call_method relu_/add_/mul_ (also on a view),
# torch.relu_, F.relu(..., inplace=True) (nn.ReLU(inplace=True) too), operator.iadd, operator.setitem
IN_PLACE_EDITS = {
    "method_relu_": lambda y: y.relu_(),
    "torch_relu_": torch.relu_,
    "functional_relu_inplace": lambda y: F.relu(y, inplace=True),
    "module_relu_inplace": nn.ReLU(inplace=True),
    "method_add_": lambda y: y.add_(1.0),
    "operator_iadd": lambda y: operator.iadd(y, 1.0),
    "view_mul_": lambda y: y.view(y.shape[0], -1).mul_(-2.0),
    "setitem": lambda y: y.__setitem__((slice(None), 0), 0.5),
}
IN_PLACE_MODELS = {"side_branch_relu": SideBranchReLU, **{name: functools.partial(EditedOutput, edit)
                                                         for name, edit in IN_PLACE_EDITS.items()}}


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("name", IN_PLACE_MODELS)
def test_in_place_edits_around_a_batchnorm(name, inner):
    torch.manual_seed(0)
    model = randomize_batchnorms(IN_PLACE_MODELS[name]()).eval().double()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x.clone())
        assert relative_error(compiled(model, inner=inner)(x.clone()), expected) < 1e-10


def frozen_block():
    """Block with BatchNorms whose affine parameters never change (affine=False)."""
    model = block(6)
    model.bn1, model.bn2 = nn.BatchNorm2d(4, affine=False), nn.BatchNorm2d(4, affine=False)
    return randomize_batchnorms(model, 6).eval().double()


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_running_statistics_updated_by_a_training_forward_are_seen(inner):
    model = frozen_block()
    fast = compiled(model, inner=inner)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        fast(x)
        for _ in range(2):
            model.train()
            fast(x + 1.0)  # updates running_mean and running_var in place
            model.eval()
            assert relative_error(fast(x), model(x)) < 1e-12


@pytest.mark.parametrize("edit", ["vector_to_parameters", "data"])
def test_edits_that_bypass_version_counters_are_seen(edit):
    model = block(8).double()
    fast = compiled(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            fast(x)
            if edit == "vector_to_parameters":
                vector = parameters_to_vector(model.parameters())
                vector_to_parameters(torch.randn_like(vector), model.parameters())
            else:
                model.bn2.running_mean.data.add_(1.0)
                model.conv2.weight.data.mul_(-1.5)
            assert relative_error(fast(x), model(x)) < 1e-12


@st.composite
def edit_sequences(draw):
    """What happens to a model between calls: eval calls at other batch sizes, a training-mode call,
    an edit through ``.data`` or ``vector_to_parameters``."""
    steps = st.one_of(st.tuples(st.just("batch"), st.integers(1, 3)), st.tuples(st.just("train"), st.just(0)),
                      st.tuples(st.just("data"), st.floats(0.5, 2.0)), st.tuples(st.just("vector"), st.integers(0, 99)))
    return draw(st.lists(steps, min_size=1, max_size=4))


def _apply(model, step, x):
    kind, value = step
    if kind == "train":
        model.train()
        model(torch.cat([x, x + 1.0]))
        model.eval()
    elif kind == "data":
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.data.mul_(value)
    elif kind == "vector":
        vector = parameters_to_vector(model.parameters())
        vector_to_parameters(torch.randn(vector.shape, generator=torch.Generator().manual_seed(value),
                                         dtype=vector.dtype), model.parameters())


@settings(max_examples=max(4, settings.default.max_examples // 10))
@given(case=conv_models(), steps=edit_sequences())
def test_backend_is_never_stale(case, steps):
    model, inputs = case
    assume(runs(model, inputs))
    model = model.double()
    x = inputs[0][0].double()
    fast = compiled(model)
    with torch.no_grad():
        fast(x)
        for step in steps:
            _apply(fast, step, x)
            batch = x.repeat(step[1], *([1] * (x.dim() - 1))) if step[0] == "batch" else x
            assert relative_error(fast(batch), model(batch)) < 1e-10


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_dynamic_shapes(inner):
    model = block(9).double()
    recorder = Recorder() if inner == "eager" else None
    torch._dynamo.reset()
    fast = torch.compile(model, backend="fxcanon", dynamic=True, options={"inner": recorder or inner})
    with torch.no_grad():
        for size in ((2, 5, 7), (3, 8, 6)):
            x = torch.randn(size[0], 3, *size[1:], dtype=torch.float64)
            assert relative_error(fast(x), model(x)) < 1e-12
    assert recorder is None or (recorder.graphs and not recorder.batchnorms())
