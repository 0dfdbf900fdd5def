"""Never a wrong model: in-place ops, hooks, pads between norms, ranks and sizes, sharing, keyword
calls, unread BatchNorms and bad input. Each case computed a different function before."""

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, symbolic_trace

from fxcanon import CanonizationError, canonicalize, get_report
from fxcanon.equivalence import randomize_batchnorms, relative_error
from fxcanon.modules import Sum
from fxcanon.zoo import count_batchnorms

from models import EditedOutput, SideBranchReLU

D = torch.float64


def prepared(model, seed=0):
    return randomize_batchnorms(model, seed).eval().double()


def assert_same(model, gm, *inputs):
    with torch.no_grad():
        expected = model(*copy.deepcopy(inputs))
        got = gm(*copy.deepcopy(inputs))
    assert relative_error(got, expected) < 1e-12


def left_reason(gm, name):
    return get_report(gm).entries[name].left_reason or ""


# --- pads between norms ----------------------------------------------------------------------------

class PadBetweenNorms(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.bn0, self.bn1, self.conv = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)
        self.value = value

    def forward(self, x):
        return self.conv(self.bn1(F.pad(self.bn0(x), (1, 1, 1, 1), value=self.value)))


@pytest.mark.parametrize("value", [0.0, 0.5])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_pad_between_two_batchnorms(value, with_inputs):
    model = prepared(PadBetweenNorms(value))
    x = torch.randn(2, 3, 5, 5, dtype=D)
    gm = canonicalize(model, (x,) if with_inputs else None)
    assert not get_report(gm).left
    for shape in [(2, 3, 5, 5), (1, 3, 2, 7), (3, 3, 1, 1)]:
        assert_same(model, gm, torch.randn(shape, dtype=D))


# --- in-place ops ----------------------------------------------------------------------------------

MUTATIONS = {
    "relu_": lambda y: y.relu_(),
    "add_": lambda y: y.add_(1.0),
    "view_mul_": lambda y: y.view(-1).mul_(2.0),
    "out=": lambda y: torch.mul(y.clone(), 2.0, out=y),
    "functional_inplace": lambda y: F.relu(y, inplace=True),
    "torch_relu_": torch.relu_,
    "index_fill_": lambda y: y.index_fill_(1, torch.tensor([0]), 0.0),
}


def test_inplace_relu_on_the_batchnorm_input():
    model = prepared(SideBranchReLU())
    x = torch.randn(2, 3, 6, 6, dtype=D)
    gm = canonicalize(model, (x,))
    assert_same(model, gm, x)
    assert "in place" in left_reason(gm, "bn")


@pytest.mark.parametrize("name", MUTATIONS)
@pytest.mark.parametrize("with_inputs", [False, True])
def test_inplace_ops_on_the_batchnorm_output(name, with_inputs):
    model = prepared(EditedOutput(MUTATIONS[name]))
    x = torch.randn(2, 3, 6, 6, dtype=D)
    gm = canonicalize(model, (x,) if with_inputs else None)
    assert_same(model, gm, x)
    assert "in place" in left_reason(gm, "bn")


def _graph_with(op):
    """``conv(bn(x))`` with ``op(bn_out)`` (an in-place node as Dynamo writes it) between them."""
    root = nn.Module()
    root.bn, root.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3)
    graph = Graph()
    x = graph.placeholder("x")
    y = graph.call_module("bn", (x,))
    op(graph, y)
    graph.output(graph.call_module("conv", (y,)))
    return prepared(GraphModule(root, graph))


@pytest.mark.parametrize("op", [
    lambda g, y: g.call_function(operator.setitem, (y, (slice(None), 0), 0.0)),
    lambda g, y: g.call_function(operator.imul, (y, 2.0)),
    lambda g, y: g.call_method("__setitem__", (y, 0, 1.0)),
], ids=["setitem", "imul", "__setitem__"])
def test_inplace_nodes_in_graphs(op):
    model = _graph_with(op)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    gm = canonicalize(model)
    assert_same(model, gm, x)
    assert "in place" in left_reason(gm, "bn")


class MutatesInputLater(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3)

    def forward(self, x):
        x = x * 1.0
        y = self.bn(x)
        x.mul_(3.0)
        return self.conv(y)


def test_batchnorm_input_changed_after_it_was_read():
    model = prepared(MutatesInputLater())
    x = torch.randn(2, 3, 6, 6, dtype=D)
    gm = canonicalize(model)
    assert_same(model, gm, x)


class ThresholdWithInplace(nn.Module):
    """BN -> ReLU(inplace) -> conv folds; an in-place op after the ReLU must stop it."""

    def __init__(self, mutate):
        super().__init__()
        self.bn, self.relu, self.conv, self.mutate = nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.Conv2d(3, 2, 1), \
            mutate

    def forward(self, x):
        r = self.relu(self.bn(x))
        if self.mutate:
            r.mul_(2.0)
        return self.conv(r)


@pytest.mark.parametrize("mutate", [False, True])
def test_threshold_fold_and_inplace_relu(mutate):
    model = prepared(nn.Sequential(nn.Conv2d(3, 3, 1), ThresholdWithInplace(mutate)))
    model[0] = nn.Identity()  # the BatchNorm has no producer: only the threshold fold can take it
    x = torch.randn(2, 3, 5, 5, dtype=D)
    gm = canonicalize(model, (x,))
    assert_same(model, gm, x)
    assert bool(get_report(gm).left) == mutate


def test_graph_changing_a_batchnorm_statistic_in_place():
    root = nn.Module()
    root.bn, root.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3)
    graph = Graph()
    x = graph.placeholder("x")
    stat = graph.get_attr("bn.running_mean")
    graph.call_method("add_", (stat, 1.0))
    graph.output(graph.call_module("conv", (graph.call_module("bn", (x,)),)))
    model = prepared(GraphModule(root, graph))
    gm = canonicalize(model)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    for _ in range(2):  # the statistic moves on every call, in both models alike
        assert_same(model, gm, x)
    assert "in place" in left_reason(gm, "bn")


# --- hooks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["bn_forward", "conv_forward", "sink_pre", "flatten", "relu"])
def test_modules_with_hooks_are_not_folded_away(where):
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                                   nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2)))
    calls = []

    def double(module, args, out=None):
        calls.append(module)
        return (args[0] * 2,) if out is None else out * 2

    index = {"bn_forward": 1, "conv_forward": 0, "sink_pre": 7, "flatten": 6, "relu": 2}[where]
    if where == "sink_pre":
        model[index].register_forward_pre_hook(double)
    else:
        model[index].register_forward_hook(double)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    gm = canonicalize(model, (x,))
    calls.clear()
    assert_same(model, gm, x)
    assert len(calls) == 2  # the original's call and the canonized model's


def test_global_forward_hooks_stop_every_fold():
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    try:
        gm = canonicalize(model)
    finally:
        handle.remove()
    assert "hooks" in left_reason(gm, "_1")


# --- ranks and sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize("with_inputs", [False, True])
@pytest.mark.parametrize("layers", ["linear_bn", "bn_linear"])
def test_batchnorm1d_folds_guard_the_rank(layers, with_inputs):
    parts = [nn.Linear(5, 5), nn.BatchNorm1d(5)]
    model = prepared(nn.Sequential(*(parts if layers == "linear_bn" else parts[::-1])))
    gm = canonicalize(model, (torch.randn(4, 5, dtype=D),) if with_inputs else None)
    assert not get_report(gm).left and "rank == 2" in str(get_report(gm))
    assert_same(model, gm, torch.randn(7, 5, dtype=D))
    x = torch.randn(4, 5, 5, dtype=D)  # the original normalizes dim 1 here, a different function
    model(x)
    with pytest.raises(AssertionError, match="fxcanon: BatchNorm .* rank == 2"):
        gm(x)


@pytest.mark.parametrize("order", ["conv_bn", "bn_conv"])
def test_unbatched_conv1d_input_raises_instead_of_a_different_result(order):
    parts = [nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)]
    model = prepared(nn.Sequential(*(parts if order == "conv_bn" else parts[::-1])))
    gm = canonicalize(model, (torch.randn(2, 4, 4, dtype=D),))
    assert_same(model, gm, torch.randn(3, 4, 9, dtype=D))
    x = torch.randn(4, 4, dtype=D)
    model(x)
    with pytest.raises(AssertionError, match="rank == 3"):
        gm(x)


class ViewsChannelsAt1x1(nn.Module):
    """``view(-1, C)`` keeps channels apart only at 1x1; the model accepts odd sizes only."""

    def __init__(self):
        super().__init__()
        self.bn, self.linear = nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        torch._assert(x.shape[2] % 2 == 1, "odd sizes only")
        return self.linear(self.bn(x).view(-1, 4))


class AcceptsTwoSizes(ViewsChannelsAt1x1):
    def forward(self, x):
        torch._assert((x.shape[2] == 1) | (x.shape[2] == 5), "sizes 1 and 5 only")
        return self.linear(self.bn(x).view(-1, 4))


@pytest.mark.parametrize("model_type", [ViewsChannelsAt1x1, AcceptsTwoSizes])
def test_layout_fold_proven_at_the_traced_size_only_is_guarded(model_type):
    """No fold at every size: the spatial sizes it was proven for are held, the batch is free."""
    model = prepared(model_type())
    gm = canonicalize(model, (torch.randn(2, 4, 1, 1, dtype=D),))
    assert_same(model, gm, torch.randn(5, 4, 1, 1, dtype=D))
    assert "dim 2 == 1, dim 3 == 1" in str(get_report(gm))
    x = torch.randn(2, 4, 3 if model_type is ViewsChannelsAt1x1 else 5, 3, dtype=D)
    model(x)
    with pytest.raises(AssertionError, match="fxcanon"):
        gm(x)


# --- sharing with the caller ------------------------------------------------------------------------

def _storages(module):
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()] if t.numel()}


def test_canonized_model_shares_nothing_with_the_caller():
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False).train()))
    for traced in (False, True):
        gm = canonicalize(symbolic_trace(model) if traced else model, allow_training=True)
        assert not _storages(gm) & _storages(model)
        before = copy.deepcopy(model.state_dict())
        with torch.no_grad():
            for p in gm.parameters():
                p.add_(1.0)
        gm(torch.randn(3, 3, 6, 6, dtype=D))  # the kept training-mode BatchNorm moves its own statistics
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_module_used_twice_stays_one_module_in_the_copy():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.PReLU()

        def forward(self, x):
            return self.act(self.act(x))

    gm = canonicalize(Twice())
    assert gm.act is not None and sum(1 for _ in gm.modules()) == 2


def test_modules_left_as_they_are_are_copies_with_their_own_state():
    """Unfolded modules (stateless, with tensors, with hooks) are copies: no module, container or
    tensor of the caller's is in the result, and a hook registered before canonicalize still fires."""
    calls = []
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda *args: calls.append(1))
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1, padding=1), nn.MaxPool2d(2),
                                   hooked, nn.Flatten(), nn.PReLU()))
    gm = canonicalize(symbolic_trace(model))
    theirs = {id(m) for m in model.modules()} | {id(t) for t in [*model.parameters(), *model.buffers()]}
    for module in gm.modules():
        assert id(module) not in theirs
        assert not {id(v) for v in vars(module).values()} & {id(v) for m in model.modules() for v in vars(m).values()
                                                             if isinstance(v, (dict, list, set))}
    assert not _storages(gm) & _storages(model) and not {id(t) for t in gm.parameters()} & theirs
    x = torch.randn(2, 3, 8, 8, dtype=D)
    assert_same(model, gm, x)
    assert len(calls) == 2  # the caller's module and its copy in gm, once each
    model[1].inplace = True  # editing the caller's modules leaves the copies alone
    assert not any(getattr(m, "inplace", False) for m in gm.modules())


def test_a_batchnorm_registered_under_two_names_folds():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.out = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
            self.norm = self.bn  # the same module under a second name

        def forward(self, x):
            return self.out(self.norm(self.conv(x)))

    model = prepared(Aliased())
    traced = symbolic_trace(model)
    assert count_batchnorms(traced) == 1
    gm = canonicalize(traced)
    assert count_batchnorms(gm) == 0 and not get_report(gm).left
    assert_same(model, gm, torch.randn(2, 3, 7, 7, dtype=D))


def test_the_result_is_a_plain_graph_module_with_its_code():
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    gm = canonicalize(symbolic_trace(model))
    assert type(gm).__mro__[1] is torch.fx.GraphModule and "bn" not in gm.code and get_report(gm).entries
    assert_same(model, copy.deepcopy(gm), torch.randn(1, 3, 5, 5, dtype=D))


def _pre_activation_block():
    """bn1 -> relu -> conv1 -> bn2 -> relu -> conv2: conv1 takes a forward and a threshold fold."""
    return prepared(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6),
                                  nn.ReLU(), nn.Conv2d(6, 3, 3, padding=1)))


def test_a_layer_folded_twice_in_one_run_is_one_fused_layer():
    model = _pre_activation_block()
    before = copy.deepcopy(model.state_dict())
    gm = canonicalize(symbolic_trace(model))
    fused = [m for m in gm.modules() if type(m).__name__ == "FusedConv2d"]
    assert count_batchnorms(gm) == 0 and fused == [gm.get_submodule("2")]  # bn2 forward, bn1 through the ReLU
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_same(model, gm, torch.randn(2, 4, 5, 5, dtype=D))


def _affine(bn):
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return s, bn.bias.double() - s * bn.running_mean.double()


def test_a_layer_folded_twice_is_computed_once_and_rounded_once():
    """conv1 takes bn2 forward and bn1 through the ReLU: the folds are deferred to the end of the
    run and computed together, in float64, rounded once (not once per fold)."""
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 96, 1, bias=False),
                                               nn.BatchNorm2d(96)), 1).eval()
    gm = canonicalize(symbolic_trace(model))
    (s1, t1), (s2, t2) = _affine(model[0]), _affine(model[3])
    w = model[2].weight.detach().double()
    once = (w * s2.reshape(-1, 1, 1, 1) * s1.reshape(1, -1, 1, 1)).float()
    per_fold = ((w * s2.reshape(-1, 1, 1, 1)).float().double() * s1.reshape(1, -1, 1, 1)).float()
    fused = gm.get_submodule("2")
    assert torch.equal(fused.weight, once) and not torch.equal(fused.weight, per_fold)
    bias = t2 + (w * s2.reshape(-1, 1, 1, 1)).flatten(1) @ t1
    assert torch.allclose(fused.bias.double(), bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_layer_folded_twice_is_rounded_once_in_its_dtype_groups_and_memory_format(dtype, groups, channels_last):
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 24, 3, groups=groups),
                                               nn.BatchNorm2d(24)), 2).eval().to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    gm = canonicalize(symbolic_trace(model))
    (s1, _), (s2, _) = _affine(model[0]), _affine(model[3])
    w = model[2].weight.detach().double()
    s1_rows = s1.reshape(groups, -1).repeat_interleave(24 // groups, 0)  # the input channels each output sees
    fused = gm.get_submodule("2").weight
    assert torch.equal(fused, (w * s2.reshape(-1, 1, 1, 1) * s1_rows[:, :, None, None]).to(dtype))
    assert fused.dtype == dtype and fused.is_contiguous(memory_format=torch.channels_last) == channels_last
    x = torch.randn(2, 16, 5, 5)
    assert relative_error(gm(x.to(dtype)).double(), model.double()(x.double())) < (1e-5 if dtype == torch.float32
                                                                                   else 3e-2)


def test_passes_run_one_at_a_time_leave_no_fold_deferred():
    """Each pass with a folder of its own, called as a torch.fx pass, by ``run`` or together in
    ``run_passes``: every fold is computed before the next pass reads the layers."""
    from fxcanon.canonicalize import run_passes
    from fxcanon.passes import FoldBatchNormForward, FoldBatchNormThroughReLU
    model = _pre_activation_block()
    x = torch.randn(2, 4, 5, 5, dtype=D)
    for call in ("call", "run", "run_passes"):
        gm = symbolic_trace(model)
        passes = [FoldBatchNormForward(), FoldBatchNormThroughReLU()]
        if call == "run_passes":
            run_passes(gm, passes)
        else:
            for canon_pass in passes:
                canon_pass(gm) if call == "call" else canon_pass.run(gm)
                conv = gm.get_submodule("2")
                assert conv.weight.untyped_storage().data_ptr() != model[2].weight.untyped_storage().data_ptr()
            gm.recompile()
        assert count_batchnorms(gm) == 0, call
        assert_same(model, gm, x)


def test_a_deferred_fold_is_computed_before_a_fold_that_adds_a_bias_kernel():
    """bn2 folds forward into the zero-padded conv (deferred); bn1 through the ReLU needs a bias
    kernel there (position-dependent shift), so the deferred fold is computed first."""
    model = prepared(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)))
    gm = canonicalize(symbolic_trace(model))
    into = [fold.into for entry in get_report(gm).entries.values() for fold in entry.folds]
    assert count_batchnorms(gm) == 0 and into == ["_2", "_2"] and gm.get_submodule("2").bias_kernel is not None
    assert_same(model, gm, torch.randn(2, 4, 5, 5, dtype=D))
    assert_same(model, gm, torch.randn(1, 4, 8, 3, dtype=D))


def test_refolding_a_canonized_model_leaves_its_layers_alone():
    """A second run folds into the first result's fused layer: into a new layer, with the same
    pass instances (one folder) as the first run."""
    from fxcanon.passes import FoldBatchNormForward, FoldBatchNormThroughReLU
    model = _pre_activation_block()
    forward, threshold = FoldBatchNormForward(), FoldBatchNormThroughReLU(folder=None)
    threshold.folder = forward.folder
    first = canonicalize(symbolic_trace(model), passes=[forward])
    assert count_batchnorms(first) == 1
    kept = {k: v.clone() for k, v in first.state_dict().items()}
    second = canonicalize(first, passes=[forward, threshold])
    assert count_batchnorms(second) == 0 and second.get_submodule("2") is not first.get_submodule("2")
    assert all(torch.equal(kept[k], v) for k, v in first.state_dict().items())
    x = torch.randn(2, 4, 5, 5, dtype=D)
    assert_same(model, first, x)
    assert_same(model, second, x)


def test_submodule_lookup_matches_get_submodule():
    from fxcanon.views import submodule
    gm = symbolic_trace(_pre_activation_block())
    for name, module in gm.named_modules():
        assert submodule(gm, name) is module
    gm.register_module("absent", None)
    for missing in ("9", "2.nothing", "absent", "absent.x"):
        with pytest.raises(AttributeError):
            submodule(gm, missing)


# --- explicit sums ---------------------------------------------------------------------------------

class AddsBroadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) + x.mean(1, keepdim=True)


def test_sums_broadcast_at_every_size():
    model = AddsBroadcast().double()
    gm = canonicalize(model, (torch.randn(1, 1, 4, dtype=D),))
    assert any(isinstance(m, Sum) for m in gm.modules())
    for shape in [(3, 1, 4), (3, 5, 4), (1, 1, 4)]:
        assert_same(model, gm, torch.randn(shape, dtype=D))


class IntegerAdds(nn.Module):
    def forward(self, a, b):
        return (a > 0) + (b > 0), a.to(torch.uint8) + b.to(torch.uint8), a + a.nelement(), a.float() + b


@pytest.mark.parametrize("with_inputs", [False, True])
def test_only_floating_additions_of_one_dtype_become_sums(with_inputs):
    model = IntegerAdds()
    a, b = torch.randn(3, 4, dtype=D) * 300, torch.randn(3, 4, dtype=D) * 300
    gm = canonicalize(model, (a, b) if with_inputs else None)
    assert not any(isinstance(m, Sum) for m in gm.modules())
    for got, expected in zip(gm(a, b), model(a, b)):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


# --- keyword calls ---------------------------------------------------------------------------------

class KeywordCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.relu, self.conv = nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3)
        self.bn2, self.conv2 = nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.conv(input=F.pad(input=self.relu(input=self.bn(input=x)), pad=(1, 1, 1, 1)))
        return self.conv2(input=self.bn2(input=y))


@pytest.mark.parametrize("with_inputs", [False, True])
def test_keyword_calls(with_inputs):
    model = prepared(KeywordCalls())
    x = torch.randn(2, 3, 5, 5, dtype=D)
    gm = canonicalize(model, (x,) if with_inputs else None)
    assert_same(model, gm, x)
    assert not get_report(gm).left


# --- every BatchNorm is reported -------------------------------------------------------------------

class ComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, training: bool = False):
        return F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight * 2, self.bn.bias,
                            False, 0.1, 1e-5) + F.batch_norm(x, self.bn.running_mean, self.bn.running_var,
                                                             training=training)


class NativeBatchNorm(ComputedWeight):
    def forward(self, x):
        return torch.native_batch_norm(x, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var,
                                       False, 0.1, 1e-5)[0]


class LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, name):
        return name == "1" or super().is_leaf_module(m, name)


def test_every_batchnorm_appears_in_the_report():
    assert len(get_report(canonicalize(symbolic_trace(ComputedWeight()).eval())).left) == 2
    assert len(get_report(canonicalize(NativeBatchNorm().eval())).left) == 1
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).eval()
    traced = GraphModule(model, LeafTracer().trace(model))
    assert [e.batchnorm for e in get_report(canonicalize(traced)).left] == ["1.1"]
    split = torch.fx.passes.split_module.split_module(symbolic_trace(model), model, lambda node: 0)
    assert len(get_report(canonicalize(split)).left) == 1


def test_functional_batchnorm_without_running_statistics_is_left_with_the_reason():
    class NoStats(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return F.batch_norm(x, None, None, self.weight, None, True, 0.1, 1e-5)

    gm = canonicalize(NoStats().eval())
    assert "track_running_stats=False" in get_report(gm).left[0].left_reason


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1.0])
def test_bad_eps_raises(eps):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=eps)).eval()
    with pytest.raises(CanonizationError, match="eps"):
        canonicalize(model)


def test_example_inputs_are_not_changed():
    class MutatesInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            x.mul_(2.0)
            return self.bn(x)

    x = torch.randn(2, 3, 4, 4)
    before = x.clone()
    canonicalize(MutatesInput().eval(), (x,))
    assert torch.equal(x, before)


def test_guarded_model_exports_and_compiles_in_one_graph():
    model = prepared(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)))
    gm = canonicalize(model)
    assert get_report(gm).entries["_1"].guards
    x = torch.randn(4, 5, dtype=D)
    assert_same(model, torch.export.export(gm, (x,)).module(), x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_integer_indices_of_an_embedding_stay_an_addition():
    """An Embedding's floating weight says nothing of the dtype of its (integer) input."""
    class Embeds(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(10, 3)

        def forward(self, a, b):
            return self.embedding(a) + self.embedding(b), a + b

    model = Embeds()
    gm = canonicalize(model)
    a, b = torch.tensor([1, 2], dtype=torch.int32), torch.tensor([3, 4], dtype=torch.int32)
    (_, got), (_, expected) = gm(a, b), model(a, b)
    assert got.dtype == expected.dtype == torch.int32 and torch.equal(got, expected)
