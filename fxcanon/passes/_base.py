"""What every fxcanon pass shares: the report, the training-mode policy, the folder."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase

from ..affine import Guard
from ..folders import Affine, GraphFolder, ModuleFolder
from ..guards import insert_guard
from ..mutation import AliasAnalysis, fold_hazard
from ..report import HOOKS, Entry, Refusal, Report
from ..views import BatchNormView, batchnorm_view, has_hooks


class CanonizationPass(PassBase):
    """A ``torch.fx.passes.infra`` pass that records what it did in a shared :class:`Report`.

    ``folder`` writes the folds: :class:`~fxcanon.folders.ModuleFolder` (default) installs fused
    modules, :class:`~fxcanon.folders.GraphFolder` emits graph computations (``torch.compile``).
    """

    def __init__(self, report: Report | None = None, *, allow_training: bool = False,
                 folder: ModuleFolder | GraphFolder | None = None) -> None:
        self.report = report if report is not None else Report()
        self.allow_training = allow_training
        self.folder = folder if folder is not None else ModuleFolder()
        self._aliases: AliasAnalysis | None = None

    def hazard(self, gm: GraphModule, *args: Any, **kwargs: Any) -> str | None:
        """:func:`fxcanon.mutation.fold_hazard`, reusing one analysis while the graph has no in-place ops."""
        if self._aliases is None or self._aliases.mutates:
            self._aliases = AliasAnalysis(gm)
        return fold_hazard(gm, *args, aliases=self._aliases, **kwargs)

    def guard(self, gm: GraphModule, value: Node, guard: Guard | None, before: Node, bn: BatchNormView,
              entry: Entry) -> None:
        """Check ``guard`` on ``value`` at call time and say so in the report. Not in ``torch.compile``
        graphs (``folder.graph_params``): Dynamo already guards ranks and sizes of its graphs."""
        if guard is None or self.folder.graph_params:
            return
        insert_guard(gm, value, guard, before, bn.name, bn.kind.name)
        entry.guards.append(guard.describe())

    def batchnorms(self, gm: GraphModule, reverse: bool = False) -> Iterator[tuple[BatchNormView, Entry, Affine]]:
        """Each foldable BatchNorm with its report entry and affine map; others are reported.

        ``reverse`` visits the last BatchNorm first (so ``BN -> BN -> conv`` folds in one sweep).
        Raises CanonizationError for training mode (unless allowed) and non-finite statistics.
        """
        self._aliases = None
        nodes = list(gm.graph.nodes)
        for node in reversed(nodes) if reverse else nodes:
            bn = batchnorm_view(gm, node, self.folder.graph_params)
            if bn is None:
                continue
            entry = self.report.entry((bn.call or node).name, bn.name)
            if has_hooks(bn.module):
                entry.refusals = [Refusal(HOOKS, "has forward hooks (folding it would drop them)")]
                continue
            affine = self.folder.affine(gm, bn, self.allow_training)
            if isinstance(affine, Refusal):
                entry.refusals = [affine]
                continue
            yield bn, entry, affine
