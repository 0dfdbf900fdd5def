"""Graph edits shared by the passes: build fused layers and put them in place.

The caller's modules are never mutated: a fused layer is a new module, installed either under
the old layer's name in this GraphModule's own container modules (which ``GraphModule`` creates
afresh) or, when the old layer is also used elsewhere, under a new name for this call site only.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, MutableSet
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from .affine import Sink
from .fold_math import (LayerTensors, batchnorm_affine, channel_affine, float64_blocks, fold_into_input, fused_input,
                        fused_output, relu_factorization)
from .modules import FUSED_FOR
from .report import Fold, fold_record
from .views import LINEAR_MODULES, BatchNormView, LinearView, call_input, submodule

# (spatial dims, transposed) -> the standard layer type
_BASE_TYPES = {layout: base for base, layout in LINEAR_MODULES.items() if base in FUSED_FOR}


def layer_tensors(view: LinearView) -> LayerTensors:
    """The layer's tensors as they are (detached), bias in float64 (zero if missing)."""
    weight = view.weight.detach()
    bias = torch.zeros(view.out_channels, dtype=torch.float64, device=weight.device) if view.bias is None \
        else view.bias.detach().double()
    bias_kernel, pad_kernel = (None if k is None else k.detach() for k in (view.bias_kernel, view.pad_kernel))
    return LayerTensors(weight, bias, bias_kernel, pad_kernel)


def _like(value: Tensor, reference: Tensor, shared: set[int]) -> nn.Parameter:
    """A new Parameter holding ``value`` with the dtype, device, memory format and grad flag of
    ``reference``; copied if it would share a storage in ``shared`` (the caller's layer's), so the
    canonized model shares no storage with the caller's."""
    fmt = torch.preserve_format
    for channels_last, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if value.dim() == rank and reference.is_contiguous(memory_format=channels_last) \
                and not reference.is_contiguous():
            fmt = channels_last
    out = value.detach().to(dtype=reference.dtype, device=reference.device, memory_format=fmt)
    if out.untyped_storage().data_ptr() in shared:
        out = out.clone()
    return nn.Parameter(out, requires_grad=reference.requires_grad)


@functools.lru_cache(maxsize=256)
def _template(cls: Callable[..., nn.Module], args: tuple[Any, ...], kwargs: tuple[tuple[str, Any], ...]) -> nn.Module:
    return cls(*args, **dict(kwargs), device="meta")


def _new_layer(cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs, device="meta")``, as a copy of a cached instance (constructing a
    layer costs an order of magnitude more than copying its attributes). The copy shares only
    immutable values with the instance: containers (parameter and hook dicts, padding lists) are new."""
    try:
        template = _template(cls, args, tuple(kwargs.items()))  # type: ignore[arg-type]  # classes hash
    except TypeError:  # an unhashable hyperparameter (a list): no template
        return cls(*args, **kwargs, device="meta")
    layer = cls.__new__(cls)
    layer.__dict__.update({key: value.copy() if isinstance(value, (dict, list, set)) else value
                           for key, value in vars(template).items()})
    return layer


def build_layer(view: LinearView, tensors: LayerTensors, input_pad: tuple[int, ...] = (),
                share: bool = False) -> nn.Module:
    """A fused layer with ``view``'s hyperparameters and the given tensors (copied where they share a
    storage with ``view``'s, unless ``share``: a stand-in until :class:`Deferred` computes its own)."""
    base = _BASE_TYPES[(view.spatial_dims, view.transposed)]
    cls = FUSED_FOR[base]
    if view.spatial_dims == 0:
        layer = _new_layer(cls, view.in_channels, view.out_channels)
    else:
        kernel_size = tuple(view.weight.shape[2:])
        common: dict[str, Any] = {"stride": view.stride, "padding": view.padding, "dilation": view.dilation,
                                  "groups": view.groups, "padding_mode": view.padding_mode}
        if view.transposed:
            common["output_padding"] = view.output_padding
        layer = _new_layer(cls, view.in_channels, view.out_channels, kernel_size, **common)
    _set_tensors(layer, view, tensors, input_pad, set() if share else _storages(view))
    layer.train(view.module.training if view.module is not None else False)
    return layer


def _storages(view: LinearView) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (view.weight, view.bias, view.bias_kernel, view.pad_kernel)
            if t is not None}


def _set_tensors(layer: nn.Module, view: LinearView, tensors: LayerTensors, input_pad: tuple[int, ...],
                 shared: set[int]) -> None:
    """Give ``layer`` the fused tensors as Parameters like ``view``'s (see :func:`_like`)."""
    reference = view.weight
    layer.weight = _like(tensors.weight, reference, shared)
    layer.bias = _like(tensors.bias, reference if view.bias is None else view.bias, shared)
    for name in ("bias_kernel", "pad_kernel"):
        kernel = getattr(tensors, name)
        if kernel is not None or getattr(layer, name, None) is not None:
            setattr(layer, name, None if kernel is None else _like(kernel, reference, shared))
    if input_pad or hasattr(layer, "input_pad"):  # convolutions only
        layer.input_pad = tuple(input_pad)  # type: ignore[assignment]


LayerFold = Callable[[LayerTensors], LayerTensors]  # a layer's tensors -> the fused layer's


@dataclass
class _Pending:
    view: LinearView  # the layer when its first deferred fold came: its tensors are where the folds start
    folds: list[LayerFold]


class Deferred:
    """Folds into layers, computed when :meth:`flush` is called rather than one by one.

    The passes only analyse and edit the graph until then (the weight products, which stream every
    weight through the caches, come after), and a layer that takes several folds (DenseNet's 1x1
    convolutions: a BatchNorm forward, the next through the ReLU) is computed once, from its own
    tensors: in float64 where it is one block (``fold_math``), rounded once. Until the flush, a
    layer that holds deferred folds is a fused layer holding the tensors the folds start from
    (sharing their storage), so that its kind, shapes and device are the fused layer's; a fold
    that changes which tensors a layer has (a bias kernel, a padding kernel) is not deferred: the
    layer's deferred folds are computed first.
    """

    def __init__(self) -> None:
        self._pending: dict[nn.Module, _Pending] = {}

    def put(self, gm: GraphModule, view: LinearView, fold: LayerFold, input_pad: tuple[int, ...],
            built: MutableSet[nn.Module], defer: bool) -> Node:
        """Make ``view.node`` compute ``fold`` of its layer: later where ``defer``; a layer in
        ``built`` (made for this graph module, called at this node alone) is updated in place, any
        other replaced by a new fused layer, added to ``built`` and installed (:func:`install_layer`)."""
        layer = view.module
        if layer is not None and layer in self._pending:
            if defer:
                self._pending[layer].folds.append(fold)
                return view.node
            self._compute(layer, self._pending.pop(layer))  # its deferred folds first: the view reads them
            tensors: dict[str, Any] = {name: getattr(layer, name, None)
                                       for name in ("weight", "bias", "bias_kernel", "pad_kernel")}
            view = replace(view, **tensors)
        if layer is not None and layer in built:
            if defer:
                self._pending[layer] = _Pending(view, [fold])
            else:
                _set_tensors(layer, view, fold(layer_tensors(view)), input_pad, set())
            return view.node
        if defer:
            layer = build_layer(view, layer_tensors(view), input_pad, share=True)
            self._pending[layer] = _Pending(view, [fold])
        else:
            layer = build_layer(view, fold(layer_tensors(view)), input_pad)
        built.add(layer)
        return install_layer(gm, view, layer)

    def flush(self) -> None:
        """Compute every deferred fold."""
        while self._pending:
            self._compute(*self._pending.popitem())

    @staticmethod
    def _compute(layer: nn.Module, pending: _Pending) -> None:
        view = pending.view
        tensors = layer_tensors(view)
        if len(pending.folds) > 1:  # in float64 between the folds where one block: rounded once
            tensors = float64_blocks(tensors)
        for fold in pending.folds:
            tensors = fold(tensors)
        _set_tensors(layer, view, tensors, view.input_pad, set() if layer is view.module else _storages(view))


def _sole_use(gm: GraphModule, node: Node) -> bool:
    """True if ``node`` is the only place the graph uses its module (or anything inside it)."""
    target, inside = str(node.target), f"{node.target}."
    graph = gm.graph
    if graph.find_nodes(op="call_module", target=target, sort=False) != [node] or \
            any(str(n.target).startswith(inside) for n in graph.find_nodes(op="get_attr", sort=False)):
        return False
    return next(submodule(gm, target).children(), None) is None or \
        not any(str(n.target).startswith(inside) for n in graph.find_nodes(op="call_module", sort=False))


def _own_container(gm: GraphModule, target: str) -> nn.Module | None:
    """The parent module of ``target`` if it belongs to ``gm`` alone (not to the traced model)."""
    prefix, _, _ = target.rpartition(".")
    parent = submodule(gm, prefix) if prefix else gm
    return parent if parent is gm or type(parent) is nn.Module else None


def fresh_name(gm: GraphModule, base: str) -> str:
    """An attribute name not yet used in ``gm``, derived from ``base``."""
    name, k = base.replace(".", "_"), 1
    while hasattr(gm, name):
        k += 1
        name = f"{base.replace('.', '_')}{k}"
    return name


def erase_norm(gm: GraphModule, bn: BatchNormView) -> None:
    """Erase the norm's output node, and its call when the output is an element of the call's tuple."""
    gm.graph.erase_node(bn.node)
    if bn.call is not None:
        gm.graph.erase_node(bn.call)


def replace_with_module(gm: GraphModule, node: Node, module: nn.Module, args: tuple[Any, ...], suffix: str) -> Node:
    """Replace ``node`` by a call of ``module`` (added under a fresh name) on ``args``."""
    name = fresh_name(gm, f"{node.name}_{suffix}")
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def install_layer(gm: GraphModule, view: LinearView, layer: nn.Module) -> Node:
    """Make ``view.node`` call ``layer``; returns the node now computing the fused layer."""
    node = view.node
    if node.op == "call_module":
        if not node.args:  # keyword input (``conv(input=x)``): fused layers take it by position
            node.args, node.kwargs = (call_input(node),), {k: v for k, v in node.kwargs.items() if k != "input"}
        target = str(node.target)
        parent = _own_container(gm, target)
        if parent is not None and _sole_use(gm, node):
            setattr(parent, target.rpartition(".")[2], layer)
        else:
            node.target = fresh_name(gm, f"{target}_fused")
            gm.add_submodule(node.target, layer)
        return node
    name = fresh_name(gm, f"{node.name}_fused")
    gm.add_submodule(name, layer)
    data = node.args[0] if node.args else node.kwargs["input"]  # read now: users may have been rewired
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (data,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


_OWN_FUNCTIONS = {batchnorm_affine, fused_output, fused_input, relu_factorization}  # emitted by GraphFolder


def finish(gm: GraphModule) -> None:
    """After a pass: drop unused ``get_attr`` nodes and unused fold computations the pass emitted
    (the caller then calls :func:`regenerate`, which checks the graph).

    Only nodes the passes orphaned go: a general dead-code sweep would also drop in-place
    calls whose results are unused.
    """
    def emitted(node: Node) -> bool:
        return node.op == "call_function" and getattr(node.target, "__wrapped__", node.target) in _OWN_FUNCTIONS

    for node in reversed(list(gm.graph.nodes)):
        if not node.users and (node.op == "get_attr" or emitted(node)
                               or (node.target is operator.getitem and emitted(node.args[0]))):
            gm.graph.erase_node(node)


def regenerate(gm: GraphModule) -> None:
    """Bring the module in line with its edited graph: check the graph, drop modules no longer
    called, regenerate code."""
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def fold_sink(gm: GraphModule, sink: Sink, s: Tensor, t: Tensor, built: MutableSet[nn.Module], deferred: Deferred,
              rule: str | None = None) -> Fold:
    """Fold ``s * x + t`` into the input of ``sink`` (see ``FoldBatchNormBackward``) and install it
    (see :meth:`Deferred.put`: deferred where it leaves the layer's tensors as they are, a vector bias)."""
    view, pad = sink.view, sink.pad
    s_in, t_in = (s, t) if sink.identity else channel_affine(sink.channel_map.to(s.device), s, t)
    vector = not (view.transposed or view.zero_padded or pad is not None or view.input_pad
                  or view.bias_kernel is not None)
    device = view.weight.device
    # the layer takes over the padding's value unless it holds this padding already
    pad_value = pad.value if pad is not None and not view.input_pad else None
    fold = functools.partial(fold_into_input, s_in=s_in.to(device), t_in=t_in.to(device), transposed=view.transposed,
                             groups=view.groups, vector_bias=vector, pad_value=pad_value)
    fused = deferred.put(gm, view, fold, pad.pad if pad is not None else view.input_pad, built, defer=vector)
    if pad is not None and pad.value != 0.0:  # the graph now pads with 0; pad_kernel restores the value
        pad.node.op, pad.node.target = "call_function", F.pad
        pad.node.args, pad.node.kwargs = (call_input(pad.node), list(pad.pad)), {}  # the input now, after rewiring
    return fold_record(fused.name, sink, vector, rule)
