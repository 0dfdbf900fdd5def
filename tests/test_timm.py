"""timm models: norm-act layers, shape asserts, mixed convolutions; canonized with no example inputs."""

import pytest
import torch

from fxcanon import canonicalize, get_report
from fxcanon.equivalence import randomize_batchnorms, relative_error

timm = pytest.importorskip("timm")

# one model per family; the last BatchNorm of resnetv2_50 reaches the classifier through its ReLU
# and pooling (followed at every size, fxcanon.shapes); DPN's goes through a SiLU, which it cannot
LEFT_WITHOUT_SHAPES = {"efficientnet_b0": 0, "mobilenetv3_small_050": 0, "regnetx_002": 0, "mixnet_s": 0,
                       "cspresnet50": 0, "resnetv2_50": 0, "dpn48b": 1}


@pytest.mark.parametrize("name", LEFT_WITHOUT_SHAPES)
def test_timm_models_fold_without_example_inputs(name):
    torch.manual_seed(0)
    model = randomize_batchnorms(timm.create_model(name, pretrained=False)).eval().double()
    gm = canonicalize(model)
    assert len(get_report(gm).left) == LEFT_WITHOUT_SHAPES[name], get_report(gm)
    for shape in [(1, 3, 64, 64), (2, 3, 80, 48)]:
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            assert relative_error(gm(x), model(x)) < 1e-12
