"""FoldNormAffine (opt-in): LayerNorm/GroupNorm affine tails folded into the next layer, exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torchvision.models.convnext import CNBlock, LayerNorm2d

from fxcanon import canonicalize, get_report
from fxcanon.equivalence import check_equivalence
from fxcanon.passes import DEFAULT_PASSES, FOLD_PASSES, FoldNormAffine
from fxcanon.report import NOT_BEFORE_LAYER

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine tails for every LayerNorm and GroupNorm of ``model`` (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.copy_(torch.rand(p.shape, generator=g) * 4 - 2)
    return model


def canonize(model, inputs):
    return canonicalize(model, inputs, passes=[FoldNormAffine])


def assert_exact(model, inputs, *checks):
    state = copy.deepcopy(model.state_dict())
    result = check_equivalence(model, inputs, [inputs, *checks], canonize=canonize)
    assert result.float64 <= 1e-10, result
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the caller's model is unchanged


def folded(gm):
    return {name: e.status for name, e in get_report(gm).entries.items()}


@given(features=st.integers(1, 6), out=st.integers(1, 4), lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       bias=st.booleans(), layer_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_norm_then_linear_folds_at_every_rank(features, out, lead, bias, layer_bias, seed):
    torch.manual_seed(seed)
    model = randomized(nn.Sequential(nn.LayerNorm(features, bias=bias), nn.Linear(features, out, bias=layer_bias)),
                       seed).eval()
    x = torch.randn(*lead, features)
    assert_exact(model, (x,), (torch.randn(features),), (torch.randn(2, 1, 2, 3, features),))
    gm = canonize(model, (x,))
    assert folded(gm) == {"_0": "folded"}
    assert gm.get_submodule("_0_normalized").weight is None


@given(dims=st.sampled_from([1, 2, 3]), groups=st.integers(1, 3), per_group=st.integers(1, 2), out=st.integers(1, 3),
       kernel=st.integers(1, 3), padding=st.integers(0, 1), transposed=st.booleans(), size=st.integers(3, 5),
       seed=st.integers(0, 2**16))
def test_group_norm_then_convolution_folds_exactly(dims, groups, per_group, out, kernel, padding, transposed, size,
                                                   seed):
    torch.manual_seed(seed)
    channels = groups * per_group
    layer = (CONV_T if transposed else CONV)[dims](channels, out, kernel, padding=padding)
    model = randomized(nn.Sequential(nn.GroupNorm(groups, channels), layer), seed).eval()
    x = torch.randn(2, channels, *[size] * dims)
    assert_exact(model, (x,), (torch.randn(1, channels, *[size + 1] * dims),))
    gm = canonize(model, (x,))
    assert folded(gm) == {"_0": "folded"} and get_report(gm).entries["_0"].guards
    unbatched = torch.randn(channels, *[size] * dims)  # GroupNorm takes dim 0 as the batch, the layer as channels
    with pytest.raises(AssertionError, match=r"fxcanon: GroupNorm '_0' was folded for inputs with input rank"):
        gm(unbatched)


def test_functional_spellings_fold():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.gn = nn.LayerNorm(4), nn.GroupNorm(2, 4)
            self.fc, self.conv = nn.Linear(4, 4), nn.Conv2d(4, 3, 3)

        def forward(self, x):
            y = self.fc(F.layer_norm(x, (4,), self.ln.weight, self.ln.bias, 1e-3))
            return self.conv(F.group_norm(y.permute(0, 3, 1, 2), 2, self.gn.weight, self.gn.bias))

    model, x = randomized(Model()).eval(), torch.randn(2, 5, 5, 4)
    assert_exact(model, (x,))
    assert set(folded(canonize(model, (x,))).values()) == {"folded"}


def test_convnext_blocks_and_downsampling_fold():
    block = randomized(nn.Sequential(CNBlock(8, layer_scale=0.5, stochastic_depth_prob=0.0),
                                     LayerNorm2d(8), nn.Conv2d(8, 16, 2, stride=2))).eval()
    x = torch.randn(2, 8, 6, 6)
    assert_exact(block, (x,), (torch.randn(1, 8, 8, 4),))
    assert set(folded(canonize(block, (x,))).values()) == {"folded"}


def test_convnext_tiny_folds_all_but_the_stem_and_head_norms():
    model = randomized(torchvision.models.convnext_tiny(weights=None)).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    gm = canonicalize(model, (x,), passes=[*FOLD_PASSES, FoldNormAffine])
    statuses = list(folded(gm).values())
    assert statuses.count("folded") == 21 and statuses.count("left") == 2
    with torch.no_grad():
        reference = model(x)
        assert ((gm(x) - reference).abs().max() / reference.abs().max()).item() <= 1e-10


class PreNormBlock(nn.Module):
    """A pre-norm transformer block (timm's ViT layout): x + attn(LN(x)), x + mlp(LN(x))."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def test_pre_norm_transformer_block_folds():
    model = randomized(PreNormBlock()).eval()
    x = torch.randn(2, 5, 8)
    assert_exact(model, (x,), (torch.randn(3, 7, 8),))
    assert folded(canonize(model, (x,))) == {"norm1": "folded", "norm2": "folded"}


def test_tails_that_cannot_fold_are_kept_with_the_reason():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.mutated, self.wide = nn.LayerNorm(4), nn.LayerNorm(4), nn.LayerNorm((3, 4))
            self.hooked, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)
            self.hooked.register_forward_hook(lambda m, i, o: None)

        def forward(self, x):
            y = self.shared(x)
            y = self.fc(y) + y
            self.mutated.weight.mul_(1.0)
            z = self.mutated(y)
            return self.fc(z) + self.fc(self.wide(x)) + self.fc(self.hooked(x))

    model, x = randomized(Model()).eval(), torch.randn(2, 3, 4)
    gm = canonize(model, (x,))
    report = get_report(gm)
    assert set(report.entries) == {"shared", "mutated", "hooked"}  # "wide" has no per-feature tail
    assert all(e.refused(NOT_BEFORE_LAYER) for e in report.left) and len(report.left) == 3
    assert "in place" in report.entries["mutated"].left_reason
    assert "hooks" in report.entries["hooked"].left_reason
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_not_a_default_pass():
    assert FoldNormAffine not in DEFAULT_PASSES
    model = randomized(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2))).eval()
    gm = canonicalize(model, (torch.randn(2, 4),))
    assert type(gm.get_submodule("0")) is nn.LayerNorm and not get_report(gm).entries
