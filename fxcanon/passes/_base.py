"""What every fxcanon pass shares: the report, the training-mode policy, BatchNorm validation."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase

from ..fold_math import batchnorm_affine
from ..report import Entry, Report
from ..views import BatchNormView, batchnorm_view, check_batchnorm


class CanonizationPass(PassBase):
    """A ``torch.fx.passes.infra`` pass that records what it did in a shared :class:`Report`."""

    def __init__(self, report: Report | None = None, *, allow_training: bool = False) -> None:
        self.report = report if report is not None else Report()
        self.allow_training = allow_training

    def batchnorms(self, gm: GraphModule) -> Iterator[tuple[BatchNormView, Entry, Tensor, Tensor]]:
        """Each foldable BatchNorm with its report entry and float64 ``(s, t)``; others are reported.

        Raises CanonizationError for training mode (unless allowed) and non-finite statistics.
        """
        for node in list(gm.graph.nodes):
            bn = batchnorm_view(gm, node)
            if bn is None:
                continue
            entry = self.report.entry(node.name, bn.name)
            reason = check_batchnorm(bn, self.allow_training)
            if reason is not None:
                entry.left_reason = reason
                continue
            s, t = batchnorm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            yield bn, entry, s, t
