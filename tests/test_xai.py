"""Explanations on canonized models: agreement with zennit's canonizers, conservation, heatmaps."""

import pytest
import torch
from torch import nn

pytest.importorskip("zennit")
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402

from fxcanon import canonicalize  # noqa: E402
from fxcanon.equivalence import randomize_batchnorms  # noqa: E402
from fxcanon.models import RelationNetwork  # noqa: E402
from fxcanon.modules import Gate, ThresholdReLU  # noqa: E402
from fxcanon.xai import BIAS_PARAMETERS, attribute, lrp_composite  # noqa: E402
from fxcanon.zoo import MIN_SIZE, build  # noqa: E402

D = torch.float64


def image(side=64, seed=0):
    return torch.randn(1, 3, side, side, dtype=D, generator=torch.Generator().manual_seed(seed))


def without_eps(model):
    """zennit's merged BatchNorms stay in the model as ``x / sqrt(1 + eps)``: with eps = 0 they are
    exactly the identity, so both canonizations compute the same function (see the test below)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 0.0
    return model


@pytest.mark.parametrize("name,canonizer", [("resnet18", ResNetCanonizer), ("vgg16_bn", VGGCanonizer)])
@pytest.mark.parametrize("composite", ["epsilon_plus", "alpha2_beta1", "eb"])
def test_relevance_equals_zennits_own_canonizer(name, canonizer, composite):
    model = without_eps(build(name).double())
    x = image()
    ours, out = attribute(model, x, 3, composite)
    theirs, out_z = attribute(model, x, 3, lrp_composite(composite, canonizers=[canonizer()]), canonize=False)
    torch.testing.assert_close(out, out_z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10 * theirs.abs().max().item())


def test_zennits_canonizer_leaves_an_eps_residue_that_fxcanon_does_not():
    model = build("resnet18").double()
    x = image()
    with torch.no_grad():
        expected = model(x)
    _, ours = attribute(model, x, 3, "epsilon_plus")
    _, theirs = attribute(model, x, 3, lrp_composite("epsilon_plus", canonizers=[ResNetCanonizer()]),
                          canonize=False)
    scale = expected.abs().max()
    assert (ours - expected).abs().max() < 1e-12 * scale
    assert (theirs - expected).abs().max() > 1e-7 * scale


def test_without_canonization_the_map_differs():
    model = build("resnet18").double()
    x = image()
    canonized, _ = attribute(model, x, 3, "epsilon_plus")
    plain, _ = attribute(model, x, 3, "epsilon_plus", canonize=False)
    assert (canonized - plain).abs().max() > 1e-3 * canonized.abs().max()


def without_biases(model, inputs):
    """The canonized model with every bias (vector, bias map, pad kernel) zero, and every
    threshold activation's threshold zero: ``theta = -t / s`` carries the BatchNorm's shift, and
    relevance reaching positions held at ``theta`` is absorbed like a bias's."""
    gm = canonicalize(model, inputs)
    with torch.no_grad():
        for module in gm.modules():
            for name in BIAS_PARAMETERS:
                if isinstance(getattr(module, name, None), nn.Parameter):
                    getattr(module, name).zero_()
            if isinstance(module, ThresholdReLU):
                module.threshold.zero_()
    return gm


def conservation_error(model, inputs, target=0):
    """|sum of input relevance - logit| / |logit|, epsilon rule (epsilon -> 0), biases zero.

    Deep random networks without biases have tiny logits (1e-14 for EfficientNet): epsilon must
    be far smaller than every pre-activation for the rule to conserve."""
    gm = without_biases(model, inputs)
    relevance, output = attribute(gm, inputs, target, "epsilon", init="logit", epsilon=1e-100, stabilizer=1e-100)
    logit = output[0, target]
    return abs(relevance.sum().item() - logit.item()) / abs(logit.item())


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn", "efficientnet_b0", "densenet121", "mobilenet_v3_large",
                                  "googlenet", "inception_v3", "regnet_y_400mf", "shufflenet_v2_x1_0"])
def test_epsilon_relevance_is_conserved_on_canonized_zoo_models(name):
    """Every family but ConvNeXt, whose LayerNorm and layer scale have no conservative rule here."""
    model = build(name).double()
    assert conservation_error(model, image(max(64, MIN_SIZE.get(name, 0)))) < 1e-6


def test_squeeze_excitation_gates_become_gate_modules():
    gm = canonicalize(build("efficientnet_b0"))
    assert sum(isinstance(m, Gate) for m in gm.modules()) == 16


@pytest.mark.parametrize("padding", [0, 1])
def test_relation_network_conserves_over_image_question_and_coordinates(padding):
    """The logit's relevance splits into the image, the question encoding (LSTM output) and the
    constant object coordinates; their sum is the logit."""
    torch.manual_seed(padding)
    rn = randomize_batchnorms(RelationNetwork(padding=padding)).eval().double()
    image_batch, question = rn.example_inputs(batch_size=1)
    gm = without_biases(rn, (image_batch.double(), question))
    states = {}
    gm.get_submodule("lstm").register_forward_hook(lambda module, args, out: states.update(h=out[0]))
    coordinates = gm.coordinates.requires_grad_(True)
    x = image_batch.double().requires_grad_(True)
    with lrp_composite("epsilon", epsilon=1e-100, stabilizer=1e-100).context(gm) as explained:
        output = explained(x, question)
        logit = torch.zeros_like(output).index_fill(1, torch.tensor([5]), 1.0) * output.detach()
        parts = torch.autograd.grad(output, [x, states["h"], coordinates], grad_outputs=logit)
    total = sum(part.sum() for part in parts)
    assert abs(total - logit.sum()) < 1e-6 * abs(logit.sum())
    assert parts[0].abs().sum() > 0 and parts[1].abs().sum() > 0


def test_relation_network_custom_composite_takes_the_question():
    rn = randomize_batchnorms(RelationNetwork()).eval()
    inputs = rn.example_inputs(batch_size=2)
    relevance, output = attribute(rn, inputs, 5, "rn_custom")
    assert relevance.shape == inputs[0].shape and output.shape == (2, 28) and torch.isfinite(relevance).all()


def test_attribute_leaves_the_callers_model_alone():
    model = build("resnet18").double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attribute(model, image(), 1, "epsilon_plus")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_explain_command_renders_rows_per_composite(tmp_path):
    from PIL import Image

    from fxcanon.cli import main

    out = tmp_path / "fig.png"
    assert main(["explain", "resnet18", "--size", "64", "--composite", "epsilon_plus", "--composite", "eb",
                 "--out", str(out)]) == 0
    figure = Image.open(out)
    assert figure.width > 3 * 64 and figure.height > 2 * 64
