"""Affine analysis: where a BatchNorm's map ``s * x + t`` can be folded. Reads the graph only.

Forward: the BatchNorm's input is a linear layer's output used by nothing else (reads of its
shape, rank, dtype or device, as in timm's ``_assert(x.ndim == 4)``, see the fused output alike).

Backward: every use of the BatchNorm's output reaches a linear layer's *input* through ops that
move or copy features without mixing them (view, permute, cat with other tensors, repeat,
getitem, average pooling, ...; section 4 of the design notes). The analysis runs those ops on a
tensor of *feature ids* (BatchNorm channel ``c`` is ``c + 1``, anything else is ``-1``), shaped
like the real values recorded by shape propagation: the ids arriving at a Linear must be the same
in every row, at a convolution the same at every position of a channel. Then the layer's input
column (or channel) ``k`` sees BatchNorm channel ``ids[k] - 1`` or the identity (A.23-A.26).

The recorded sizes are one point; ``fxcanon.shapes.SymbolicCone`` says which sizes *vary* with
the input. The map is proven for every size when (by induction over the ops) the ids are constant
along every varying dim: ops that move elements within dims keep that (a pooling window or a
slice of a constant row is constant); a reshape may merge or split a varying dim only with dims
along which the ids are constant too, or into output sizes that do not vary with features at
strides that do not vary (else the column a channel reaches depends on the size);
ops whose arguments vary are followed only where they act on varying dims (repeat, expand,
reshapes, narrow and slice bounds); a Linear's feature axis and a convolution's channel axis must
not vary. The BatchNorm's sizes that do not vary are held by a call-time guard. Where the map
cannot be proven at free sizes, sizes from example inputs are held instead (all but the batch;
all of them when the symbolic run fails). Without recorded shapes, the BatchNorm's output is
seeded at small sizes and only what it feeds is run (``fxcanon.shapes.seeded_shapes``); where that
does not prove the fold at every size, shapes are recorded at inputs made from the graph
(``fxcanon.shapes.record_hint_shapes``).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, cast

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .errors import CanonizationError
from .shapes import (HINTED_KEY, RESAMPLE_FUNCTIONS, RESAMPLE_MODULES, VALUE_KEY, SymbolicCone, record_hint_shapes,
                     seeded_shapes)
from .views import (_DROPOUT_MODULES, PAD_FUNCTIONS, BatchNormView, ConstantPadView, LinearView, bind_args,
                    constant_pad_view, get_attr_value, has_hooks, linear_view, reads_only_metadata, submodule,
                    tensor_rank)

_CAST_METHODS = {"to", "type_as", "float", "double", "half", "bfloat16"}
# Ops that move or copy elements without mixing them (every output is one input element): they
# commute with any per-channel affine map, and the feature ids say where each channel went.
# flip/roll/index_select/pixel (un)shuffle/channel shuffle only reorder; nearest resampling copies.
_MOVE_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "movedim", "unsqueeze", "squeeze",
    "repeat", "expand", "expand_as", "contiguous", "clone", "narrow", "chunk", "split", "__getitem__",
    "flip", "roll", "index_select", "view_as", "reshape_as", "swapaxes", "swapdims",
}
_MOVE_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.movedim, torch.unsqueeze, torch.squeeze,
    torch.cat, torch.concat, torch.stack, torch.narrow, torch.chunk, torch.split, torch.clone, torch.t,
    operator.getitem, torch.flip, torch.roll, torch.index_select, torch.swapaxes, F.pixel_shuffle,
    F.pixel_unshuffle, F.channel_shuffle, torch.channel_shuffle,
}
_MOVE_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
# nearest resampling copies elements; linear, bilinear, bicubic, trilinear and area modes are
# weighted sums whose weights add up to 1 at every output (an average, checked like pooling)
_NEAREST_MODES = {"nearest", "nearest-exact"}
# reshapes: checked on the symbolic sizes of their input and output, whatever their arguments
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
# moves whose varying arguments act on varying dims only (a varying count or size of its own)
_SIZED_METHODS = {"repeat", "expand"}
# ops whose other tensor arguments are data of their own (identity features)
_JOINS = {torch.cat, torch.concat, torch.stack, "expand_as"}

_AVERAGE_FUNCTIONS = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, torch.mean,
}
_AVERAGE_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_MAX_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                  F.adaptive_max_pool3d}
_MAX_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_ADAPTIVE_MAX_ARGS = ("input", "output_size", "return_indices")
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


class _Stop(Exception):
    """The path cannot carry the affine map; the message says where and why."""


@dataclass(frozen=True)
class Guard:
    """A condition on a tensor's shape that a fold needs: rank ``rank`` and ``sizes[d]`` at dim ``d``.

    Written into the graph as a check that raises at call time (``fxcanon.guards``)."""

    rank: int
    sizes: tuple[tuple[int, int], ...] = ()
    why: str = ""

    def describe(self) -> str:
        sizes = "".join(f", dim {d} == {n}" for d, n in self.sizes)
        return f"input rank == {self.rank}{sizes} ({self.why})"


@dataclass(frozen=True)
class ForwardFold:
    """``BN(layer(x))``: fold into the producer's output channels (``guard`` on the fused output).

    ``channels``: the BatchNorm channels this producer makes when the BatchNorm normalizes a
    channel concatenation of several layers' outputs (None: all of them)."""

    bn: BatchNormView
    producer: LinearView
    guard: Guard | None = None
    channels: slice | None = None


@dataclass(frozen=True)
class Sink:
    """A linear layer whose input column/channel ``k`` sees BatchNorm channel ``channel_map[k]`` (-1: none)."""

    view: LinearView
    channel_map: Tensor
    path: tuple[str, ...] = ()
    pad: ConstantPadView | None = None  # explicit constant padding right before a convolution
    guard: Guard | None = None  # on the BatchNorm's input
    identity: bool = False  # ``channel_map`` is ``arange``: channel ``k`` sees BatchNorm channel ``k``


@dataclass
class BackwardFold:
    """Fold into ``sinks``; ``rewired`` users then read the BatchNorm's input instead of its output."""

    bn: BatchNormView
    sinks: list[Sink] = field(default_factory=list)
    rewired: list[Node] = field(default_factory=list)
    left_reason: str | None = None  # why some users keep the BatchNorm
    guard: Guard | None = None  # on the BatchNorm's input


def rank_guard(bn: BatchNormView, rank: int) -> Guard | str | None:
    """Whether ``bn`` normalizes the axis a layer sees as channels (dim 1 at rank ``rank``): a reason
    if not, a rank guard if only the call-time rank can tell (BatchNorm1d takes rank 2 and 3,
    functional BatchNorms any rank), None if the BatchNorm itself accepts only that rank."""
    recorded, accepted = tensor_rank(bn.input), bn.accepted_ranks
    if (accepted is not None and rank not in accepted) or (recorded is not None and recorded != rank):
        return "its channel axis is not the BatchNorm's"
    if accepted == (rank,):
        return None
    return Guard(rank, why=f"{bn.name!r} normalizes dim 1, the layer's channel axis at this rank only")


def _only_for(node: Node, user: Node) -> bool:
    """True if ``user`` is the only use of ``node`` that reads more than its shape, dtype or device."""
    return all(u is user or reads_only_metadata(u, node) for u in node.users)


def _producer_fold(gm: GraphModule, bn: BatchNormView, node: Node, consumer: Node, channels: slice | None,
                   graph_params: bool) -> ForwardFold | str:
    producer = linear_view(gm, node, graph_params)
    if producer is None:
        return f"input {node.name} is not a Linear/Conv/ConvTranspose layer"
    if has_hooks(producer.module):
        return f"{node.name} has forward hooks"
    if not _only_for(node, consumer):
        return f"output of {node.name} has other users besides the BatchNorm"
    count = bn.num_features if channels is None else channels.stop - channels.start
    if producer.out_channels != count:
        return f"{node.name}: its output channels are not the BatchNorm's"
    guard = rank_guard(bn, producer.batched_rank)
    if isinstance(guard, str):
        return f"{node.name}: {guard}"
    return ForwardFold(bn, producer, guard, channels)


def _channel_concatenation(node: Node) -> list[Node] | None:
    """The inputs of ``torch.cat(tensors, dim=1)``, else None."""
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return None
    args = bind_args(node, ("tensors", "dim"))
    tensors = args.get("tensors")
    if args.get("dim", 0) != 1 or not isinstance(tensors, (list, tuple)) or \
            not all(isinstance(t, Node) for t in tensors) or len(set(tensors)) != len(tensors):
        return None
    return list(tensors)


def forward_folds(gm: GraphModule, bn: BatchNormView, graph_params: bool = False) -> list[ForwardFold] | str:
    """Forward folds of ``bn``: into the layer that produces its input, or into each layer whose
    output a channel concatenation feeding only ``bn`` joins (slice ``k`` of the BatchNorm's
    channels into layer ``k``: ``BN(cat(a, b)) = cat(BN_a(a), BN_b(b))``); else the reason."""
    pieces = _channel_concatenation(bn.input)
    if pieces is None or not _only_for(bn.input, bn.node):
        fold = _producer_fold(gm, bn, bn.input, bn.node, None, graph_params)
        return fold if isinstance(fold, str) else [fold]
    folds, start = [], 0
    for piece in pieces:
        view = linear_view(gm, piece, graph_params)
        stop = start + (view.out_channels if view is not None else 0)
        fold = _producer_fold(gm, bn, piece, bn.input, slice(start, stop), graph_params)
        if isinstance(fold, str):
            return f"concatenation {bn.input.name}: {fold}"
        folds.append(fold)
        start = stop
    if start != bn.num_features:
        return f"concatenation {bn.input.name}: its channels are not the BatchNorm's"
    return folds


def _ids_to_map(ids: Tensor) -> Tensor:
    if not bool(((ids == -1) | ((ids >= 1) & (ids == ids.round()))).all()):
        raise _Stop("features are mixed on the way")
    return torch.where(ids > 0, ids - 1, ids).long()


def _channel_map(view: LinearView, ids: Tensor) -> Tensor:
    """The BatchNorm channel each input column/channel of ``view`` sees, from the ids at its input."""
    name = view.node.name
    if view.spatial_dims == 0:
        if ids.dim() < 1 or ids.shape[-1] != view.in_channels:
            raise _Stop(f"{name}: feature axis is not the Linear's input axis")
        rows = ids.reshape(-1, view.in_channels)
    else:
        if ids.dim() != view.batched_rank:
            raise _Stop(f"{name}: unbatched or unexpected input rank")
        rows = ids.transpose(0, 1).reshape(ids.shape[1], -1).T
    if rows.shape[0] == 0 or not bool((rows == rows[0]).all()):
        unit = "column" if view.spatial_dims == 0 else "channel"
        raise _Stop(f"{name}: a BatchNorm channel does not map to one input {unit}")
    return _ids_to_map(rows[0])


def _pad_sink(gm: GraphModule, pad: ConstantPadView, graph_params: bool) -> LinearView | None:
    """The convolution right after constant padding, if the padding feeds only it (spatial axes only)."""
    if len(pad.node.users) != 1:
        return None
    conv = linear_view(gm, next(iter(pad.node.users)), graph_params)
    if conv is None or conv.transposed or conv.spatial_dims == 0 or conv.input is not pad.node:
        return None
    if len(pad.pad) > 2 * conv.spatial_dims or min(pad.pad) < 0:
        return None
    if conv.input_pad and conv.input_pad != pad.pad:
        return None
    return conv


class _ConePropagation:
    """Runs the uses of one BatchNorm on feature ids (see module docstring)."""

    def __init__(self, gm: GraphModule, bn: BatchNormView, s: Tensor | None, graph_params: bool) -> None:
        self.gm, self.bn, self.s, self.graph_params = gm, bn, s, graph_params
        self.cone: SymbolicCone | None = None
        self.ids: dict[Node, Any] = {}
        self.paths: dict[Node, tuple[str, ...]] = {}
        self.sinks: list[Sink] = []
        self.steps: list[Node | Sink] = []  # the ops followed and the sinks reached, in order
        self.handled: set[Node] = set()

    def _meta_shape(self, node: Node) -> tuple[int, ...]:
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        if shape is None:
            raise _Stop(f"{node.name}: no recorded shape (pass example_inputs)")
        if not all(isinstance(d, int) for d in shape):
            raise _Stop(f"{node.name}: symbolic shape, features not followed")
        return tuple(shape)

    def _varying(self, node: Any) -> tuple[Any, ...]:
        return self.cone.varying(node) if self.cone is not None else ()

    def run(self) -> list[Sink]:
        shape = self._meta_shape(self.bn.node)
        if len(shape) < 2:
            raise _Stop("normalized tensor has no channel axis")
        ids = torch.arange(1, shape[1] + 1, dtype=torch.float64).reshape(1, -1, *([1] * (len(shape) - 2)))
        self.ids[self.bn.node] = ids.expand(shape).contiguous()
        self.paths[self.bn.node] = ()
        node = self.bn.node.next  # what uses the BatchNorm comes after it (graphs are in topological order)
        while node.op != "root":
            if node not in self.handled and any(arg in self.ids for arg in node.all_input_nodes):
                self._visit(node)
            node = node.next
        return self.sinks

    def check(self, cone: SymbolicCone) -> list[Sink]:
        """The sinks of :meth:`run`, its steps checked against ``cone``'s symbolic sizes (raises
        _Stop where a fold may not hold at every size): what following the features again with
        the cone would check, without following them again (the recorded sizes give the same ids)."""
        self.cone = cone
        for step in self.steps:
            if isinstance(step, Sink):
                self._check_axis(step)
            else:
                self._check_sizes(step)
                self._check_varying(step, self.ids[step])
        return self.sinks

    def reach(self) -> set[Node]:
        """Raise _Stop unless every use of the BatchNorm reaches linear layers through ops that
        could carry it (the part of the analysis that needs no shapes); else the BatchNorm's node
        and those ops."""
        reached, pending = {self.bn.node}, [self.bn.node]
        while pending:
            for node in pending.pop().users:
                if node in reached or all(reads_only_metadata(node, arg) for arg in node.all_input_nodes
                                          if arg in reached):
                    continue
                view = linear_view(self.gm, node, self.graph_params)
                if (view is not None and view.input in reached) or constant_pad_view(self.gm, node) is not None:
                    continue
                if node.op == "output":
                    raise _Stop("the BatchNorm's output reaches the model output")
                if not (node.op == "call_method" and node.target in _CAST_METHODS) and self._kind(node) is None:
                    raise _Stop(f"{node.name} ({node.op} {_target_name(node.target)}) mixes features non-linearly")
                reached.add(node)
                pending.append(node)
        return reached

    def _sink(self, view: LinearView, node: Node, path: tuple[str, ...], pad: ConstantPadView | None = None) -> None:
        """``view`` reads ``node`` (through ``pad``)."""
        self.sinks.append(Sink(view, _channel_map(view, self.ids[node]), path, pad))
        self.steps.append(self.sinks[-1])

    def _check_axis(self, sink: Sink) -> None:
        """A sink's feature or channel axis must not vary."""
        view = sink.view
        varying = self._varying(view.input if sink.pad is None else sink.pad.input)
        axis = -1 if view.spatial_dims == 0 else 1
        if varying and varying[axis]:
            raise _Stop(f"{view.node.name}: its {'feature' if axis < 0 else 'channel'} axis varies with the input size")

    def _visit(self, node: Node) -> None:
        cone_args = [arg for arg in node.all_input_nodes if arg in self.ids]
        path = self.paths[cone_args[0]]
        if all(reads_only_metadata(node, arg) for arg in cone_args):
            return
        if node.op == "call_module" and has_hooks(submodule(self.gm, str(node.target))):
            raise _Stop(f"{node.name} has forward hooks")
        view = linear_view(self.gm, node, self.graph_params)
        if view is not None and cone_args == [view.input]:
            self._sink(view, view.input, path)
            return
        pad = constant_pad_view(self.gm, node)
        if pad is not None and cone_args == [pad.input]:
            conv = _pad_sink(self.gm, pad, self.graph_params)
            if conv is None:
                raise _Stop(f"{node.name}: constant padding that does not feed a convolution directly")
            self._sink(conv, pad.input, path, pad)
            self.handled.add(conv.node)
            return
        self.ids[node] = self._propagate(node)
        self.paths[node] = (*path, node.name)

    def _lookup(self, node: Node, joins: bool) -> Any:
        if node in self.ids:
            return self.ids[node]
        if VALUE_KEY in node.meta:
            return node.meta[VALUE_KEY]
        if node.op == "get_attr":  # a constant index (index_select)
            value = get_attr_value(self.gm, str(node.target))
            if isinstance(value, Tensor) and not value.is_floating_point():
                return value
        if joins and hasattr(node.meta.get("tensor_meta"), "shape"):
            return torch.full(self._meta_shape(node), -1.0, dtype=torch.float64)
        raise _Stop(f"{node.name}: mixes the BatchNorm's output with another tensor")

    def _propagate(self, node: Node) -> Any:
        if node.op == "output":
            raise _Stop("the BatchNorm's output reaches the model output")
        kind = self._kind(node)
        if kind is None:
            raise _Stop(f"{node.name} ({node.op} {_target_name(node.target)}) mixes features non-linearly")
        if kind == "cast":
            return self.ids[cast(Node, node.args[0])]
        self.steps.append(node)
        joins = node.target in _JOINS
        args = map_arg(node.args, lambda n: self._lookup(n, joins))
        kwargs = map_arg(node.kwargs, lambda n: self._lookup(n, joins))
        run = self._runner(node)
        try:
            out = run(*args, **kwargs)
        except Exception as error:  # the op does not accept the ids: do not follow
            raise _Stop(f"{node.name}: could not follow the features ({type(error).__name__})") from error
        if kind == "average":  # weights add up to 1 (up to rounding): equal ids in, the same id out
            if not torch.allclose(run(*_squared(args), **kwargs), out * out, rtol=1e-12, atol=0.0):
                raise _Stop(f"{node.name}: averages over different features")
            out = out.round()
        elif kind == "max":
            if not bool((-run(*_negated(args), **kwargs) == out).all()):
                raise _Stop(f"{node.name}: takes a maximum over different features")
            channels = _ids_to_map(out.flatten())
            if self.s is None:
                raise _Stop(f"{node.name}: max pooling needs the BatchNorm's scale, unknown here")
            if bool((self.s[channels[channels >= 0].unique()] < 0).any()):
                raise _Stop(f"{node.name}: max pooling does not commute with a negative BatchNorm scale")
        return out

    def _check_varying(self, node: Node, out: Any) -> None:
        """The ids of ``node`` must be constant along every dim whose size varies."""
        varying = self._varying(node)
        for tensor, dims in zip(*((out, varying) if isinstance(out, (tuple, list)) else ((out,), (varying,)))):
            if isinstance(tensor, Tensor) and not all(_constant_along(tensor, d) for d, v in enumerate(dims) if v):
                raise _Stop(f"{node.name}: features differ along a size that varies with the input")

    def _check_sizes(self, node: Node) -> None:
        """Refuse ``node`` where its feature map could depend on sizes that vary (module docstring)."""
        cone = self.cone
        assert cone is not None
        if _is_reshape(self.gm, node):
            self._check_reshape(node, cone)
            return
        if node.target in ("roll", torch.roll) and bind_args(node, ("input", "shifts", "dims")).get("dims") is None:
            raise _Stop(f"{node.name}: rolls the flattened tensor")
        squeeze = bind_args(node, ("input", "dim")) if node.target in ("squeeze", torch.squeeze) else {}
        if isinstance(squeeze.get("input"), Node):
            varying, dims = self._varying(squeeze["input"]), squeeze.get("dim")
            dims = range(len(varying)) if dims is None else dims if isinstance(dims, (tuple, list)) else (dims,)
            if any(varying[d] for d in dims if isinstance(d, int)):  # its rank would depend on the size
                raise _Stop(f"{node.name}: squeezes a size that varies with the input")
        if any(arg not in self.ids and cone.value_varies(arg) for arg in node.all_input_nodes) and \
                not self._varies_varying_dims_only(node, cone):
            raise _Stop(f"{node.name}: an argument varies with the input size")

    def _varies_varying_dims_only(self, node: Node, cone: SymbolicCone) -> bool:
        """True if the arguments of ``node`` that vary act on dims of its input that vary (the ids
        are constant along those): repeat and expand counts, narrow and slice bounds."""
        if node.op == "call_method" and node.target in _SIZED_METHODS:
            return True
        if node.target in ("narrow", torch.narrow):
            args = bind_args(node, ("input", "dim", "start", "length"))
            varying, dim = self._varying(args.get("input")), args.get("dim")
            return isinstance(dim, int) and -len(varying) <= dim < len(varying) and bool(varying[dim])
        if node.target in (operator.getitem, "__getitem__") and len(node.args) == 2 and node.args[0] in self.ids:
            varying = self._varying(node.args[0])
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            dim = 0
            for k, item in enumerate(index):
                if item is Ellipsis:
                    dim = len(varying) - sum(i is not None and i is not Ellipsis for i in index[k + 1:])
                elif item is not None:
                    parts = (item.start, item.stop, item.step) if isinstance(item, slice) else (item,)
                    if any(isinstance(p, Node) and cone.value_varies(p) for p in parts) and \
                            not (0 <= dim < len(varying) and varying[dim] is True):
                        return False
                    dim += 1
            return True
        return False

    def _check_reshape(self, node: Node, cone: SymbolicCone) -> None:
        source = node.args[0] if node.args else None
        if not isinstance(source, Node) or source not in self.ids:
            raise _Stop(f"{node.name}: reshapes another tensor like the BatchNorm's output")
        ids, ins, outs = self.ids[source], cone.sizes(source), cone.sizes(node)
        if ins is None or outs is None:
            raise _Stop(f"{node.name}: no symbolic sizes")
        for group_in, group_out in _reshape_groups(node.name, cone, ins, outs):
            out_varies = any(cone.expr_varies(outs[d]) for d in group_out)
            if (len(group_in) == 1 and len(group_out) == 1) or all(_constant_along(ids, d) for d in group_in) or \
                    (not out_varies and not any(cone.expr_varies(ins[d]) for d in group_in)):
                continue
            # features vary along some input dims: the output dims must not vary, and where such a
            # dim ``d`` lands (flat index // the product of the sizes after it) must not either
            if out_varies or any(not _constant_along(ids, d) and
                                 cone.expr_varies(sympy.Mul(*(ins[e] for e in group_in[k:])))
                                 for k, d in enumerate(group_in)):
                raise _Stop(f"{node.name}: merges or splits features with a size that varies with the input")

    def _runner(self, node: Node) -> Any:
        if node.op == "call_module":
            return submodule(self.gm, str(node.target))
        if node.op == "call_method":
            return lambda self_, *a, **k: getattr(self_, str(node.target))(*a, **k)
        return node.target

    def _kind(self, node: Node) -> str | None:
        if node.op == "call_method" and node.target in _CAST_METHODS:
            dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
            return "cast" if dtype is not None and dtype.is_floating_point else None
        if node.op == "call_method":
            return "move" if node.target in _MOVE_METHODS else "average" if node.target == "mean" else None
        if node.op == "call_function":
            if node.target in _MOVE_FUNCTIONS:
                return "move"
            if node.target is F.dropout:
                return "move" if not bind_args(node, ("input", "p", "training")).get("training", True) else None
            if node.target in PAD_FUNCTIONS:
                return "move" if bind_args(node, ("input", "pad", "mode")).get("mode", "constant") != "constant" \
                    else None
            if node.target in _AVERAGE_FUNCTIONS:
                return "average" if bind_args(node, _AVG_POOL_ARGS).get("divisor_override") is None else None
            if node.target in RESAMPLE_FUNCTIONS:
                return _resample_kind(bind_args(node, _INTERPOLATE_ARGS).get("mode", "nearest"))
            if node.target in _MAX_FUNCTIONS:
                names = _ADAPTIVE_MAX_ARGS if "adaptive" in node.target.__name__ else _MAX_POOL_ARGS
                return None if bind_args(node, names).get("return_indices", False) else "max"
            return None
        if node.op == "call_module":
            module = submodule(self.gm, str(node.target))
            if isinstance(module, _MOVE_MODULES) or (isinstance(module, _DROPOUT_MODULES) and not module.training):
                return "move"
            if isinstance(module, _AVERAGE_MODULES):
                return "average" if getattr(module, "divisor_override", None) is None else None
            if isinstance(module, RESAMPLE_MODULES):
                return _resample_kind(module.mode)
            if isinstance(module, _MAX_MODULES) and not module.return_indices:
                return "max"
        return None


_INTERPOLATE_ARGS = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def _resample_kind(mode: Any) -> str | None:
    return "move" if mode in _NEAREST_MODES else "average" if isinstance(mode, str) else None


def _squared(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0] * args[0], *args[1:])


def _negated(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (-args[0], *args[1:])


def _constant_along(ids: Tensor, dim: int) -> bool:
    return ids.shape[dim] == 0 or bool((ids == ids.narrow(dim, 0, 1)).all())


def _is_reshape(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(submodule(gm, str(node.target)), _RESHAPE_MODULES)
    return node.target in (_RESHAPE_METHODS if node.op == "call_method" else _RESHAPE_FUNCTIONS)


def _reshape_groups(name: str, cone: SymbolicCone, ins: tuple[Any, ...],
                    outs: tuple[Any, ...]) -> list[tuple[list[int], list[int]]]:
    """Consecutive dims of a reshape's input and output with equal products (dims of size 1 left
    out): within a group the row-major order maps elements, across groups dims stay apart."""
    a = [d for d, size in enumerate(ins) if size != 1]
    b = [d for d, size in enumerate(outs) if size != 1]
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        group_in, group_out, left, right = [a[i]], [b[j]], ins[a[i]], outs[b[j]]
        i, j = i + 1, j + 1
        while not cone.equal(left, right):
            if cone.hint(left) < cone.hint(right) and i < len(a):
                group_in.append(a[i])
                left, i = left * ins[a[i]], i + 1
            elif cone.hint(right) < cone.hint(left) and j < len(b):
                group_out.append(b[j])
                right, j = right * outs[b[j]], j + 1
            else:
                raise _Stop(f"{name}: its sizes cannot be matched for every input size")
        groups.append((group_in, group_out))
    if i < len(a) or j < len(b):
        raise _Stop(f"{name}: its sizes cannot be matched for every input size")
    return groups


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _direct_sink(gm: GraphModule, bn: BatchNormView, user: Node, graph_params: bool) -> Sink | str:
    """A sink for a direct use of ``bn`` needing no recorded shapes, or the reason it is none."""
    pad = constant_pad_view(gm, user)
    view = _pad_sink(gm, pad, graph_params) if pad is not None and pad.input is bn.node \
        else linear_view(gm, user, graph_params)
    if view is None or (pad is None and view.input is not bn.node) or \
            any(arg is bn.node for arg in view.node.all_input_nodes if arg is not view.input):
        return f"{user.name} ({_target_name(user.target)}) is not a linear layer"
    if has_hooks(view.module):
        return f"{user.name} has forward hooks"
    if view.in_channels != bn.num_features:
        return f"{user.name}: its input channels are not the BatchNorm's"
    guard = rank_guard(bn, view.batched_rank)
    if isinstance(guard, str):
        return f"{user.name}: {guard}"
    return Sink(view, identity_map(bn.num_features), (), pad, guard, identity=True)


@functools.lru_cache(maxsize=64)
def identity_map(channels: int) -> Tensor:
    """``arange(channels)``, the channel map of a direct use; one tensor per size (maps are read only)."""
    return torch.arange(channels)


def _size_guard(bn: BatchNormView, rank_guard: Guard | None, cone: SymbolicCone | None) -> Guard | None:
    """The sizes of the normalized tensor that do not vary (all of them without a symbolic run)
    are held at their recorded values: features were followed at those sizes only."""
    shape = tuple(bn.node.meta["tensor_meta"].shape)
    varying = cone.varying(bn.node) if cone is not None else ()
    fixed = tuple((d, n) for d, n in enumerate(shape) if d != 1 and not (d < len(varying) and varying[d]))
    if not fixed:
        return rank_guard
    why = "features were followed through layout ops at these sizes only"
    if rank_guard is not None:
        why = f"{rank_guard.why}; {why}"
    return Guard(len(shape), fixed, why)


def _symbolic_cone(gm: GraphModule, bn: BatchNormView, nodes: list[Node], sinks: list[Sink],
                   held: tuple[int, ...], chosen: bool) -> SymbolicCone | None:
    """The symbolic sizes of ``nodes`` fed by ``bn`` and read by ``sinks`` (whose channels fix
    some), its ``held`` dims constant (sizes recorded as 1 free if the model accepts that, else
    constants); None where the run fails on shapes from example inputs (every size is then held),
    _Stop where it fails on sizes of our ``chosen``."""
    fixed = [(sink.view.input, -1 if sink.view.spatial_dims == 0 else -1 - sink.view.spatial_dims,
              sink.view.in_channels) for sink in sinks]
    for free_ones in (True, False):
        try:
            return SymbolicCone(gm, bn.node, nodes, free_ones, held, fixed)
        except CanonizationError as error:
            failure = error
    if chosen:  # holding sizes of our own choosing would refuse real inputs
        raise _Stop(f"{failure} (pass example_inputs)") from failure
    return None


def _local_seed(bn: BatchNormView) -> Tensor | None:
    """The BatchNorm's output at small sizes of our choosing (batch 2, other sizes 8) where the
    BatchNorm accepts one rank only, else None."""
    like = next((t for t in (bn.running_mean, bn.weight) if t is not None), None)
    if like is None or bn.accepted_ranks is None or len(bn.accepted_ranks) != 1:
        return None
    return like.new_zeros(2, bn.num_features, *[8] * (bn.accepted_ranks[0] - 2))


def _followed(gm: GraphModule, bn: BatchNormView, s: Tensor | None, graph_params: bool,
              chosen: bool) -> BackwardFold:
    """:func:`_cone_fold` on the recorded shapes (``chosen``: sizes of our choosing, none held)."""
    at_recorded = _ConePropagation(gm, bn, s, graph_params)
    sinks = at_recorded.run()
    nodes = list(at_recorded.ids)
    cone = None if graph_params else _symbolic_cone(gm, bn, nodes, sinks, (1,), chosen)
    if cone is not None:
        try:
            sinks = at_recorded.check(cone)
        except _Stop:
            rank = len(bn.node.meta["tensor_meta"].shape)
            if chosen or rank < 3:  # sizes of our own choosing are not worth holding
                raise
            cone = _symbolic_cone(gm, bn, nodes, sinks, tuple(range(1, rank)), chosen)
            sinks = at_recorded.sinks if cone is None else at_recorded.check(cone)
    guard = rank_guard(bn, len(bn.node.meta["tensor_meta"].shape))
    if isinstance(guard, str):
        raise _Stop(guard)
    if any(sink.path for sink in sinks):
        guard = _size_guard(bn, guard, cone)
    return BackwardFold(bn, sinks, list(bn.node.users), guard=guard)


def _cone_fold(gm: GraphModule, bn: BatchNormView, s: Tensor | None, graph_params: bool) -> BackwardFold:
    """Every use of ``bn`` followed to linear layers (raises _Stop where that fails).

    Followed at the recorded sizes first; then each step checked against the symbolic sizes of
    the nodes on the way and of the layers reached (their weights fix their input sizes), except in
    ``torch.compile`` graphs (Dynamo guards sizes itself). Where that fails at free sizes and the
    sizes come from example inputs, the BatchNorm's sizes but the batch are held (and guarded):
    its output is seeded with free sizes even where the ops before it fix them (global pooling).

    Without recorded shapes, the BatchNorm's output is seeded at small sizes of its own
    (:func:`_local_seed`, only the ops it feeds are run); that fold stands if the symbolic run
    proves it at every size of the BatchNorm's but its channels. Otherwise shapes are recorded
    at inputs made from the graph, if the ops on the way could carry the map."""
    cone = _ConePropagation(gm, bn, s, graph_params).reach()  # needs no shapes: before anything that does
    if not graph_params and "tensor_meta" not in bn.node.meta:
        seed = _local_seed(bn)
        if seed is not None:
            with seeded_shapes(gm, bn.node, seed, cone) as seeded:
                try:
                    fold = _followed(gm, bn, s, graph_params, True) if seeded else None
                except _Stop:
                    fold = None
            if fold is not None and (fold.guard is None or not fold.guard.sizes):
                return fold
        if not record_hint_shapes(gm):
            raise _Stop(f"{bn.node.name}: no recorded shape (pass example_inputs)")
    return _followed(gm, bn, s, graph_params, bool(gm.meta.get(HINTED_KEY)))


def _direct_plan(gm: GraphModule, bn: BatchNormView, graph_params: bool) -> tuple[BackwardFold, list[str]]:
    """The direct uses of ``bn`` folded (needing no recorded shapes), and why others are not."""
    plan = BackwardFold(bn)
    reasons = []
    for user in bn.node.users:
        sink = _direct_sink(gm, bn, user, graph_params)
        if isinstance(sink, Sink) and plan.sinks and sink.guard != plan.guard:
            sink = f"{user.name}: needs another input rank than {plan.sinks[0].view.node.name}"
        if isinstance(sink, Sink):
            plan.sinks.append(sink)
            plan.rewired.append(user)
            plan.guard = sink.guard
        elif reads_only_metadata(user, bn.node):
            plan.rewired.append(user)
        else:
            reasons.append(sink)
    return plan, reasons


def backward_fold(gm: GraphModule, bn: BatchNormView, s: Tensor | None,
                  graph_params: bool = False) -> BackwardFold | str:
    """Where ``bn`` can be folded into the layers that consume it, or the reason it cannot.

    ``s`` (the BatchNorm's scale, None when unknown) decides whether max pooling commutes.
    Direct uses are tried first; shapes are needed only for paths through other ops.
    """
    plan, reasons = _direct_plan(gm, bn, graph_params)
    if plan.sinks and not reasons:
        return plan
    try:
        return _cone_fold(gm, bn, s, graph_params)
    except _Stop as stop:
        whole = str(stop)
    if not plan.sinks:
        return whole
    plan.left_reason = f"kept for {'; '.join(reasons)}"
    return plan
