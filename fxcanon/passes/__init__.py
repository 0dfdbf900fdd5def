"""The canonization passes, each a ``torch.fx.passes.infra`` pass, and their default order."""

from __future__ import annotations

from collections.abc import Sequence

from torch.fx import GraphModule

from ._base import CanonizationPass
from .explicit_gates import ExplicitGates
from .explicit_pooling import ExplicitPooling
from .explicit_sums import ExplicitSums
from .fold_backward import FoldBatchNormBackward
from .fold_forward import FoldBatchNormForward
from .fold_identity_branch import FoldIdentityBranch
from .fold_norm_affine import FoldNormAffine
from .fold_threshold import FoldBatchNormThroughReLU, is_pre_activation
from .precompute_parameters import PrecomputeParameterBatchNorms

# Constants first (weight standardization: the layers it feeds become plain layers); forward folds
# before the others: they never need a bias map; the threshold activation only where neither applies;
# identity branches after the folds (their sibling conv -> BN is one layer then), before sums become modules.
DEFAULT_PASSES: tuple[type[CanonizationPass], ...] = (
    PrecomputeParameterBatchNorms, FoldBatchNormForward, FoldBatchNormBackward, FoldBatchNormThroughReLU,
    FoldIdentityBranch, ExplicitSums, ExplicitGates, ExplicitPooling,
)
# The folds alone, without the explicit modules for LRP (sums, gates, pooling): for inference.
FOLD_PASSES: tuple[type[CanonizationPass], ...] = DEFAULT_PASSES[:5]
# The explicit modules alone, BatchNorms kept: the paper's "not canonized" baseline for LRP.
# Not in any of these: FoldNormAffine (LayerNorm/GroupNorm affine tails), opt-in.
STRUCTURAL_PASSES: tuple[type[CanonizationPass], ...] = DEFAULT_PASSES[5:]

PREFER = ("forward", "threshold")
PRESETS = ("paper",)

PassLike = type[CanonizationPass] | CanonizationPass


def ordered(passes: Sequence[PassLike], prefer: str = "forward", preset: str | None = None,
            graph_module: GraphModule | None = None) -> list[PassLike]:
    """``passes`` in the order that gives the preferred canonical form where a BatchNorm could go either way.

    A BatchNorm between a layer and a ReLU that feeds layers (``conv1 -> norm -> relu -> conv2``)
    folds forward into ``conv1`` (``prefer="forward"``, the default: a vector bias, the fastest
    model) or through the ReLU into ``conv2`` (``"threshold"``: a threshold activation, and a bias
    map where ``conv2`` is zero-padded). ``preset="paper"`` picks what Pahde et al.'s canonizers do:
    ``"threshold"`` for pre-activation networks (DenseNet: :func:`is_pre_activation` of
    ``graph_module``), ``"forward"`` otherwise (VGG, ResNet, EfficientNet).
    """
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        prefer = "threshold" if graph_module is not None and is_pre_activation(graph_module) else "forward"
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {', '.join(PREFER)}, not {prefer!r}")
    if prefer == "forward":
        return list(passes)

    def through_relu(p: PassLike) -> bool:
        return (p if isinstance(p, type) else type(p)) is FoldBatchNormThroughReLU

    return [p for p in passes if through_relu(p)] + [p for p in passes if not through_relu(p)]


__all__ = [
    "DEFAULT_PASSES", "FOLD_PASSES", "PREFER", "PRESETS", "STRUCTURAL_PASSES", "CanonizationPass", "ExplicitGates",
    "ExplicitPooling", "ExplicitSums", "FoldBatchNormBackward", "FoldBatchNormForward", "FoldBatchNormThroughReLU",
    "FoldIdentityBranch", "FoldNormAffine", "PrecomputeParameterBatchNorms", "is_pre_activation", "ordered",
]
