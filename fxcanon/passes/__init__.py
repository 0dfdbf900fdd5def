"""The canonization passes, each a ``torch.fx.passes.infra`` pass, and their default order."""

from ._base import CanonizationPass
from .fold_backward import FoldBatchNormBackward
from .fold_forward import FoldBatchNormForward

# Forward folds first: they never need a bias map.
DEFAULT_PASSES: tuple[type[CanonizationPass], ...] = (FoldBatchNormForward, FoldBatchNormBackward)

__all__ = ["DEFAULT_PASSES", "CanonizationPass", "FoldBatchNormBackward", "FoldBatchNormForward"]
