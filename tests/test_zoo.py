"""The model zoo canonized: no BatchNorm left, same outputs at two input sizes.

Random weights with randomized BatchNorm statistics and affine parameters (no download).
"""

import operator

import pytest
import torch

from fxcanon import canonicalize
from fxcanon.equivalence import check_equivalence
from fxcanon.modules import Sum
from fxcanon.zoo import MIN_SIZE, ZOO, build, count_batchnorms

from conftest import DEVICES


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_is_canonized_exactly(name):
    model = build(name)
    side = max(64, MIN_SIZE.get(name, 0))
    inputs = (torch.randn(1, 3, side, side),)
    gm = canonicalize(model, inputs)
    assert count_batchnorms(torch.fx.symbolic_trace(model)) > 0 or name == "convnext_tiny"
    assert count_batchnorms(gm) == 0
    other = (torch.randn(2, 3, side + 16, side + 8),)
    result = check_equivalence(model, inputs, [inputs, other])
    assert result.float64 <= 1e-9 and result.holds(float64_tolerance=1e-9), result


def test_convnext_graph_is_unchanged_but_for_sums():
    model = build("convnext_tiny")
    traced = torch.fx.symbolic_trace(model)
    gm = canonicalize(traced)
    added = {torch.stack, torch.broadcast_tensors}

    def operations(g, skip):
        return sorted(str(n.target) for n in g.graph.nodes
                      if n.target not in skip and not (n.op == "call_module" and isinstance(g.get_submodule(n.target), Sum)))

    assert sum(isinstance(m, Sum) for m in gm.modules()) == 18
    assert operations(gm, added) == operations(traced, {operator.add})


@pytest.mark.parametrize("device", DEVICES)
def test_resnet18_on_each_device(device):
    model = build("resnet18").to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    gm = canonicalize(model, (x,))
    assert count_batchnorms(gm) == 0
    assert all(p.device.type == device for p in gm.parameters())
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
