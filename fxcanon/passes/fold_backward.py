"""BatchNorm -> (layout ops) -> Linear/Conv/ConvTranspose folded into the consumers' inputs
(supplement A.6-A.9, padding A.10-A.20, through concatenation A.21-A.26)."""

from __future__ import annotations

import torch.nn.functional as F
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from ..affine import BackwardFold, Sink, backward_fold
from ..fold_math import channel_affine, fold_into_input
from ..report import BACKWARD_BIAS_MAP, BACKWARD_VECTOR, THROUGH_LAYOUT, Fold, index_ranges
from ..rewrite import build_layer, finish, install_layer, layer_tensors
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
        for bn, entry, s, t in self.batchnorms(graph_module):
            plan = backward_fold(graph_module, bn, s)
            if not isinstance(plan, BackwardFold):
                if not entry.folds:
                    entry.left_reason = f"{entry.left_reason}; not before a layer: {plan}" if entry.left_reason \
                        else plan
                continue
            for user in plan.rewired:
                user.replace_input_with(bn.node, bn.input)
            for sink in plan.sinks:
                entry.folds.append(self._fold(graph_module, sink, s, t))
            if not bn.node.users:
                graph_module.graph.erase_node(bn.node)
            entry.left_reason = plan.left_reason
            modified = True
        if modified:
            finish(graph_module)
        return PassResult(graph_module, modified)

    @staticmethod
    def _fold(gm: GraphModule, sink: Sink, s, t) -> Fold:
        view, pad = sink.view, sink.pad
        s_in, t_in = channel_affine(sink.channel_map.to(s.device), s, t)
        vector = not (view.transposed or view.zero_padded or pad is not None or view.input_pad
                      or view.bias_kernel is not None)
        tensors = fold_into_input(layer_tensors(view), s_in.to(view.weight.device), t_in.to(view.weight.device),
                                  transposed=view.transposed, groups=view.groups, vector_bias=vector,
                                  pad_value=pad.value if pad is not None else 0.0)
        layer = build_layer(view, tensors, pad.pad if pad is not None else view.input_pad)
        fused = install_layer(gm, view, layer)
        if pad is not None and pad.value != 0.0:
            pad.node.op, pad.node.target = "call_function", F.pad
            pad.node.args, pad.node.kwargs = (pad.node.args[0], list(pad.pad)), {}
        rule = THROUGH_LAYOUT if sink.path else BACKWARD_VECTOR if vector else BACKWARD_BIAS_MAP
        changed = index_ranges(sink.channel_map.ge(0).nonzero().flatten().tolist())
        return Fold(fused.name, rule, sink.path + ((pad.node.name,) if pad is not None else ()), changed)
