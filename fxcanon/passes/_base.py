"""What every fxcanon pass shares: the report, the training-mode policy, the folder."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..affine import Guard
from ..folders import Affine, GraphFolder, ModuleFolder
from ..guards import insert_guard
from ..report import HOOKS, Entry, Refusal, Report
from ..rewrite import regenerate
from ..views import BatchNormView, batchnorm_view, has_hooks, never_a_norm


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

    def __call__(self, graph_module: GraphModule) -> PassResult:
        """Run the pass, then drop unused modules and regenerate code if the graph changed (as
        ``torch.fx.passes.infra.PassManager`` regenerates after each pass)."""
        result = self.run(graph_module)
        if result.modified:
            regenerate(result.graph_module)
        return result

    def run(self, graph_module: GraphModule) -> PassResult:
        """Run the pass (with its ``requires``/``ensures`` checks), its folds computed, and leave the
        code as it is: :func:`fxcanon.canonicalize.run_passes` regenerates it once after all passes."""
        result = self.sweep(graph_module)
        self.folder.flush(graph_module)
        return result

    def sweep(self, graph_module: GraphModule) -> PassResult:
        """:meth:`run` without computing the folds the folder deferred (its ``flush`` does):
        :func:`fxcanon.canonicalize.run_passes` sweeps passes that share a folder one after the
        other and flushes where the folder changes and at the end."""
        result = super().__call__(graph_module)
        assert result is not None  # every pass returns a PassResult
        return result

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
        modules, no_norms = self.folder.norm_modules(gm)
        found: dict[Node, tuple[BatchNormView, tuple[Any, ...]]] = {}
        for node in reversed(gm.graph.nodes) if reverse else gm.graph.nodes:
            if node in no_norms:
                continue
            view = batchnorm_view(gm, node, self.folder.graph_params, modules)
            if view is not None:
                found[node] = view, _arguments(view)
            elif never_a_norm(node, modules):
                no_norms.add(node)
        self.folder.prefetch([view for view, _ in found.values()], self.allow_training)
        for node, (bn_seen, arguments) in found.items():
            # afresh where earlier folds of this sweep rewired the call or erased it
            bn = bn_seen if all(map(operator.is_, _arguments(bn_seen), arguments)) else \
                batchnorm_view(gm, node, self.folder.graph_params, modules)
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


def _arguments(bn: BatchNormView) -> tuple[Any, ...]:
    """What a view reads from the graph: the arguments of its node and call (to compare by identity:
    an edit of a node's arguments makes new containers)."""
    node, call = bn.node, bn.call
    return (node.args, node.kwargs) if call is None else (node.args, node.kwargs, call.args, call.kwargs)
