"""The CLEVR Relation Network canonized exactly (supplement Appendix B, A.21-A.26)."""

import pytest
import torch
from torch import nn
from torch.fx import symbolic_trace

from fxcanon import FusedLinear, canonicalize, get_report
from fxcanon.equivalence import check_equivalence, randomize_batchnorms
from fxcanon.models import RelationNetwork
from fxcanon.report import BACKWARD_BIAS_MAP, BACKWARD_VECTOR, THROUGH_LAYOUT


def network(padding=0):
    torch.manual_seed(padding)
    return randomize_batchnorms(RelationNetwork(padding=padding), seed=padding).eval()


def batchnorms(gm):
    return [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]


def test_architecture_matches_the_supplement():
    rn = network()
    image, question = rn.example_inputs()
    assert image.shape[1:] == (3, 127, 127) and rn.grid == 7
    assert rn.g[0].in_features == 180 and rn.f[-1].out_features == 28
    assert rn(image, question).shape == (2, 28)


def test_every_batchnorm_goes_where_appendix_b_says():
    rn = network()
    gm = canonicalize(symbolic_trace(rn), rn.example_inputs())
    assert not batchnorms(gm)
    entries = get_report(gm).entries
    for name, conv in (("encoder_2", "encoder_3"), ("encoder_5", "encoder_6"), ("encoder_8", "encoder_9")):
        fold, = entries[name].folds
        assert (fold.into, fold.rule) == (conv, BACKWARD_VECTOR)
    fold, = entries["encoder_11"].folds
    assert (fold.into, fold.rule, fold.inputs) == ("g_0", THROUGH_LAYOUT, "0:24, 26:50")
    assert "cat" in fold.path and "repeat" in fold.path


def test_g1_columns_outside_the_image_features_are_bit_identical():
    rn = network()
    gm = canonicalize(rn)  # the model provides example_inputs() itself
    g1 = gm.get_submodule("g.0")
    assert isinstance(g1, FusedLinear)
    for cols in (slice(24, 26), slice(50, 180)):
        assert torch.equal(g1.weight[:, cols], rn.g[0].weight[:, cols])
    for cols in (slice(0, 24), slice(26, 50)):
        assert not torch.equal(g1.weight[:, cols], rn.g[0].weight[:, cols])


@pytest.mark.parametrize("padding", [0, 1])
def test_float64_and_float32_equivalence_over_batches_and_question_lengths(padding):
    rn = network(padding)
    checks = [rn.example_inputs(batch, length, seed) for batch, length, seed in ((1, 3, 1), (2, 8, 2), (3, 12, 3))]
    result = check_equivalence(rn, rn.example_inputs(), checks)
    assert result.holds(), result


def test_padded_variant_uses_bias_maps_and_leaves_no_batchnorm():
    rn = network(padding=1)
    gm = canonicalize(symbolic_trace(rn), rn.example_inputs())
    assert not batchnorms(gm)
    rules = [fold.rule for entry in get_report(gm).entries.values() for fold in entry.folds]
    assert rules == [BACKWARD_BIAS_MAP] * 3 + [THROUGH_LAYOUT]


@pytest.mark.parametrize("padding", [0, 1])
def test_without_example_inputs_every_batchnorm_folds_for_every_batch(padding):
    rn = network(padding)
    gm = canonicalize(symbolic_trace(rn))  # the trace has no example_inputs()
    assert not batchnorms(gm) and not any(entry.guards for entry in get_report(gm).entries.values())
    fold, = get_report(gm).entries["encoder_11"].folds
    assert (fold.into, fold.rule, fold.inputs) == ("g_0", THROUGH_LAYOUT, "0:24, 26:50")
    checks = [rn.example_inputs(batch, length, seed) for batch, length, seed in ((1, 3, 1), (4, 9, 2))]
    result = check_equivalence(rn, rn.example_inputs(), checks, canonize=lambda m, x: canonicalize(symbolic_trace(m)))
    assert result.holds(), result
