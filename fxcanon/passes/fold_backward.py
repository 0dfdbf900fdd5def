"""BatchNorm -> (layout ops) -> Linear/Conv/ConvTranspose folded into the consumers' inputs
(supplement A.6-A.9, padding A.10-A.20, through concatenation A.21-A.26)."""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from ..affine import BackwardFold, backward_fold
from ..mutation import fold_hazard
from ..report import KEPT_FOR_USERS, NOT_BEFORE_LAYER, Refusal
from ..rewrite import erase_norm, finish
from ._base import CanonizationPass


class FoldBatchNormBackward(CanonizationPass):
    """``layer(s_in * x + t_in) = layer_{W diag(s_in)}(x) + B``  (A.6-A.9, A.10-A.20, A.23-A.26).

    ``s_in``/``t_in`` are the BatchNorm's ``(s, t)`` on the input columns/channels it reaches and
    ``(1, 0)`` elsewhere, so weights of columns that do not come from the BatchNorm stay
    bit-identical. ``B = b + sum(W t_in)`` when every output sees every tap (Linear; Conv without
    zero padding, or with reflect/replicate/circular padding, which commutes with a per-channel
    affine map). With zero padding, an explicit ``F.pad(value=v)`` or a ConvTranspose consumer,
    ``B = layer_W(P_v(T)) + b`` depends on the position and on the input size: the fused layer
    computes it in its ``forward`` from ``bias_kernel = W diag(t_in)`` (see ``fxcanon.modules``).
    A BatchNorm used by anything else stays for those users; it is removed once no user is left.
    """

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        for bn, entry, affine in self.batchnorms(graph_module, reverse=True):
            plan = backward_fold(graph_module, bn, affine.scale, self.folder.graph_params)
            if isinstance(plan, BackwardFold) and not all(self.folder.supports_sink(k) for k in plan.sinks):
                plan = "a consumer's kind is not supported here"
            if isinstance(plan, BackwardFold):
                hazard = fold_hazard(graph_module, (bn.node, *(k.view.node for k in plan.sinks)), bn.node, bn.input,
                                     bn.node)
                plan = hazard if hazard is not None else plan
            if not isinstance(plan, BackwardFold):
                if not entry.folds and not entry.refused(NOT_BEFORE_LAYER):
                    entry.refusals.append(Refusal(NOT_BEFORE_LAYER, f"not before a layer: {plan}"))
                continue
            self.guard(graph_module, bn.input, plan.guard, bn.node, bn, entry)
            for user in plan.rewired:
                user.replace_input_with(bn.node, bn.input)
            for sink in plan.sinks:
                entry.folds.append(self.folder.fold_input(graph_module, sink, affine.s, affine.t))
            if not bn.node.users:
                erase_norm(graph_module, bn)
            entry.refusals = [] if plan.left_reason is None else [Refusal(KEPT_FOR_USERS, plan.left_reason)]
            modified = True
        finish(graph_module)
        return PassResult(graph_module, modified)
