"""Adversarial stacks (Hypothesis): what the rest of a graph can do to the tensors a fold touches.

Random conv/BatchNorm/ReLU stacks mixed with in-place ops on every tensor (directly, through a
view, with ``out=``, on an earlier tensor), constant pads between norms, hooks, keyword calls,
residual additions (also of mixed dtypes), canonized with or without example inputs and called
at other batch sizes, sizes and ranks. Each call must equal the float64 original, or raise
fxcanon's guard error where the fold holds only for the traced rank or size.
"""

import copy
import os

import torch
import torch.nn.functional as F
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

from fxcanon import canonicalize, get_report
from fxcanon.equivalence import relative_error

from test_properties import randomize_statistics

EXAMPLES = int(os.environ.get("FXCANON_ADVERSARIAL", 20000 if os.environ.get("FXCANON_HYPOTHESIS") == "dev" else 150))
D = torch.float64

INPLACE = {
    "relu_": lambda h: h.relu_(),
    "add_": lambda h: h.add_(0.5),
    "view_mul_": lambda h: h.view(-1).mul_(-2.0),
    "index_fill_": lambda h: h.index_fill_(1, torch.tensor([0]), 0.25),
    "out=": lambda h: torch.mul(h, 3.0, out=h),
    "functional": lambda h: F.relu(h, inplace=True),
}


class Stack(nn.Module):
    """Runs ``program``: a list of ``(kind, argument)`` steps over the current tensor ``h``."""

    def __init__(self, program, layers):
        super().__init__()
        self.program, self.layers = program, nn.ModuleList(layers)

    def forward(self, x):
        h, saved = x, [x]
        for (kind, arg), layer in zip(self.program, self.layers):
            if kind == "layer":
                h = layer(h)
            elif kind == "keyword":
                h = layer(input=h)
            elif kind == "functional_bn":
                h = F.batch_norm(h, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.1,
                                 layer.eps)
            elif kind == "pad":
                h = F.pad(h, (1, 1) * (h.dim() - 2), value=arg)
            elif kind == "inplace":
                INPLACE[arg](h)
            elif kind == "side":
                INPLACE[arg](saved[-1])
            elif kind == "save":
                saved.append(h)
            elif kind == "residual":
                h = h + (saved[-1].float().double() if arg else saved[-1])
        return h


@st.composite
def stacks(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    dims = draw(st.sampled_from([1, 2]))
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    channels = draw(st.integers(1, 4))
    program, layers, grow, saved_grow = [], [], 0, [0]
    for _ in range(draw(st.integers(2, 9))):
        kind = draw(st.sampled_from(["conv", "bn", "bn", "relu", "pad", "inplace", "side", "save", "residual",
                                     "functional_bn", "hook"]))
        layer, step = nn.Identity(), None
        if kind == "conv":
            padding = draw(st.integers(0, 1))
            layer = conv(channels, channels, draw(st.sampled_from([1, 3])), padding=padding,
                         padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect"])) if padding else "zeros")
            grow += 2 * padding - (layer.kernel_size[0] - 1)
            step = ("keyword" if draw(st.booleans()) else "layer", None)
        elif kind in ("bn", "functional_bn"):
            layer = bn(channels, affine=draw(st.booleans()))
            randomize_statistics(layer, draw(st.integers(0, 2**16)))
            step = ("layer" if kind == "bn" else "functional_bn", None)
        elif kind == "relu":
            layer, step = nn.ReLU(inplace=draw(st.booleans())), ("layer", None)
        elif kind == "pad":
            step, grow = ("pad", draw(st.sampled_from([0.0, 0.5]))), grow + 2
        elif kind in ("inplace", "side"):
            step = (kind, draw(st.sampled_from(sorted(INPLACE))))
        elif kind == "save":
            step = ("save", None)
            saved_grow.append(grow)
        elif kind == "residual" and saved_grow[-1] == grow:
            step = ("residual", draw(st.booleans()))
        elif kind == "hook" and layers and not isinstance(layers[-1], nn.Identity):
            scale = draw(st.sampled_from([2.0, -1.0]))
            layers[-1].register_forward_hook(lambda module, args, out: out * scale)
        if step is not None:
            program.append(step)
            layers.append(layer)
    program.append(("layer", None))
    layers.append(conv(channels, 2, 1))  # a layer at the end, for folds to go into
    model = Stack(program, layers).eval().double()
    smallest = max(1, 1 - grow)  # convolutions without padding must leave at least one position
    size = draw(st.integers(smallest, smallest + 5))
    batch = draw(st.integers(1, 3))
    example = torch.randn(batch, channels, *[size] * dims, dtype=D)
    calls = [example, torch.randn(batch + 1, channels, *[size + 2] * dims, dtype=D),
             torch.randn(channels, *[size + 1] * dims, dtype=D)]  # other batch, size and rank
    return model, example if draw(st.booleans()) else None, calls


def _outcome(model, x):
    try:
        with torch.no_grad():
            return model(x.clone())
    except (RuntimeError, ValueError, AssertionError, IndexError) as error:
        return error


@settings(max_examples=EXAMPLES)
@given(case=stacks())
def test_adversarial_stacks_compute_the_original_function(case):
    model, example, calls = case
    assume(not isinstance(_outcome(model, calls[0]), Exception))
    state = copy.deepcopy(model.state_dict())
    gm = canonicalize(model, None if example is None else (example,))
    report = get_report(gm)
    event(f"BatchNorms folded: {sum(bool(e.folds) for e in report.entries.values())}, left: {len(report.left)}")
    for x in calls:
        expected = _outcome(model, x)
        if isinstance(expected, Exception):
            continue
        got = _outcome(gm, x)
        if isinstance(got, AssertionError) and str(got).startswith("fxcanon:"):
            event("a guard raised")
            continue  # a guard: the fold holds at the traced rank and sizes only, and says so
        assert not isinstance(got, Exception), got
        assert relative_error(got, expected) <= 1e-10, (relative_error(got, expected), gm.code)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
