"""The canonization passes, each a ``torch.fx.passes.infra`` pass, and their default order."""

from ._base import CanonizationPass
from .explicit_gates import ExplicitGates
from .explicit_pooling import ExplicitPooling
from .explicit_sums import ExplicitSums
from .fold_backward import FoldBatchNormBackward
from .fold_forward import FoldBatchNormForward
from .fold_threshold import FoldBatchNormThroughReLU

# Forward folds first: they never need a bias map; the threshold activation only where neither applies.
DEFAULT_PASSES: tuple[type[CanonizationPass], ...] = (
    FoldBatchNormForward, FoldBatchNormBackward, FoldBatchNormThroughReLU, ExplicitSums, ExplicitGates,
    ExplicitPooling,
)
# The folds alone, without the explicit modules for LRP (sums, gates, pooling): for inference.
FOLD_PASSES: tuple[type[CanonizationPass], ...] = DEFAULT_PASSES[:3]
# The explicit modules alone, BatchNorms kept: the paper's "not canonized" baseline for LRP.
STRUCTURAL_PASSES: tuple[type[CanonizationPass], ...] = DEFAULT_PASSES[3:]

__all__ = [
    "DEFAULT_PASSES", "FOLD_PASSES", "STRUCTURAL_PASSES", "CanonizationPass", "ExplicitGates", "ExplicitPooling", "ExplicitSums",
    "FoldBatchNormBackward", "FoldBatchNormForward", "FoldBatchNormThroughReLU",
]
