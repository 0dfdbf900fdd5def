"""Bad input gets a clear error or a report entry, never a silently wrong model."""

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from fxcanon import CanonizationError, canonicalize, get_report
from fxcanon.equivalence import relative_error

from models import random_bn


def conv_bn():
    return random_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_training_mode_batchnorm_raises_and_names_the_module():
    model = conv_bn().train()
    with pytest.raises(CanonizationError, match=r"'1'.*eval\(\)"):
        canonicalize(model)


def test_training_mode_can_be_left_untouched_on_request():
    model = conv_bn().train()
    gm = canonicalize(model, allow_training=True)
    assert "training mode" in get_report(gm).entries["_1"].left_reason
    assert isinstance(gm.get_submodule("1"), nn.BatchNorm2d)


@pytest.mark.parametrize("allow", [False, True])
def test_shape_recording_does_not_move_training_statistics(allow):
    model = conv_bn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        canonicalize(model, torch.randn(4, 3, 6, 6), allow_training=allow)
    except CanonizationError:
        assert not allow
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_functional_training_batchnorm_raises():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return nn.functional.batch_norm(x, self.bn.running_mean, self.bn.running_var, training=True)

    with pytest.raises(CanonizationError, match="training mode"):
        canonicalize(Net().eval())


def test_track_running_stats_false_is_left_and_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    gm = canonicalize(model)
    assert "track_running_stats=False" in get_report(gm).entries["_1"].left_reason
    x = torch.randn(2, 3, 5, 5)
    assert relative_error(gm(x), model(x)) == 0


@pytest.mark.parametrize("field,value", [("running_mean", math.nan), ("running_var", math.inf),
                                         ("weight", math.nan), ("bias", -math.inf)])
def test_non_finite_statistics_raise_and_name_the_module(field, value):
    model = conv_bn()
    getattr(model[1], field).data[0] = value
    with pytest.raises(CanonizationError, match=rf"'1'.*{field}"):
        canonicalize(model)


def test_untraceable_model_raises_a_canonization_error():
    class Dynamic(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(CanonizationError, match="symbolic_trace"):
        canonicalize(Dynamic())


def test_original_model_is_bit_identical_afterwards():
    model = random_bn(torchvision.models.resnet18(num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    gm = canonicalize(torch.fx.symbolic_trace(model))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dict(model.named_modules()).keys() == modules_before.keys()
    assert all(model.get_submodule(k) is m for k, m in modules_before.items())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())


def test_traced_graph_module_is_not_changed():
    traced = torch.fx.symbolic_trace(conv_bn())
    code = traced.code
    canonicalize(traced)
    assert traced.code == code and isinstance(traced.get_submodule("1"), nn.BatchNorm2d)


def test_passing_a_copy_through_deepcopy_and_state_dict_roundtrip():
    model = conv_bn().double()
    gm = canonicalize(model)
    clone = copy.deepcopy(gm)
    clone.load_state_dict(gm.state_dict())
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    assert relative_error(clone(x), model(x)) < 1e-12


def _stack_of_batchnorms():
    torch.manual_seed(3)
    layers = [nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-3), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, affine=False),
              nn.Conv2d(5, 6, 1), nn.BatchNorm2d(6, eps=0.5), nn.Conv2d(6, 2, 1), nn.BatchNorm2d(2)]
    return random_bn(nn.Sequential(*layers)).eval()


def test_affine_maps_computed_together_equal_those_computed_one_by_one():
    from torch.fx import symbolic_trace

    from fxcanon.folders import ModuleFolder
    from fxcanon.views import batchnorm_view

    gm = symbolic_trace(_stack_of_batchnorms())
    views = [v for v in (batchnorm_view(gm, n) for n in gm.graph.nodes) if v is not None]
    together, alone = ModuleFolder(), ModuleFolder()
    together.prefetch(views, False)
    assert len(together._affines) == 4
    for view in views:
        a, b = together.affine(gm, view, False), alone.affine(gm, view, False)
        assert torch.equal(a.s, b.s) and torch.equal(a.t, b.t) and a.s.dtype == torch.float64


@pytest.mark.parametrize("problem", ["nan", "zero_variance"])
def test_the_first_bad_batchnorm_is_named_when_several_are_bad(problem):
    model = _stack_of_batchnorms()
    with torch.no_grad():
        if problem == "nan":
            model[3].running_mean[1] = math.nan
        else:
            model[3].running_var.zero_()
            model[3].eps = 0.0
    model[5].train()  # a second problem after it
    with pytest.raises(CanonizationError, match="'3'.*(NaN|running_var)"):
        canonicalize(model)
