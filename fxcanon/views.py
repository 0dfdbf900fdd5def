"""Op views: one way to read a node, whatever its spelling.

A convolution may be a ``call_module`` (``nn.Conv2d``) or a ``call_function``
(``torch.conv2d``, ``F.conv2d``) whose parameters are ``get_attr`` nodes; a BatchNorm may be
``nn.BatchNorm2d``, ``F.batch_norm`` (timm's ``BatchNormAct2d``), ``torch.batch_norm`` or
``torch.native_batch_norm`` (the norm kinds and their spellings are declared in ``fxcanon.kinds``).
Passes read nodes only through the views below and never test targets themselves.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from .errors import CanonizationError
from .kinds import AFFINE_TAIL_KINDS, BATCH_NORM, AffineTailKind, NormKind, function_kind, module_kind
from .modules import FUSED_TYPES
from .report import TRAINING, Refusal

# module type -> (spatial dims, transposed); spatial dims 0 means Linear
LINEAR_MODULES: dict[type, tuple[int, bool]] = {
    nn.Linear: (0, False),
    nn.Conv1d: (1, False),
    nn.Conv2d: (2, False),
    nn.Conv3d: (3, False),
    nn.ConvTranspose1d: (1, True),
    nn.ConvTranspose2d: (2, True),
    nn.ConvTranspose3d: (3, True),
}
LINEAR_MODULES.update({fused: LINEAR_MODULES[base] for fused, base in FUSED_TYPES.items()})

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
# functional target -> (argument names, spatial dims, transposed)
LINEAR_FUNCTIONS: dict[Callable[..., Any], tuple[tuple[str, ...], int, bool]] = {
    F.linear: (("input", "weight", "bias"), 0, False),
    torch.conv1d: (_CONV_ARGS, 1, False),
    torch.conv2d: (_CONV_ARGS, 2, False),
    torch.conv3d: (_CONV_ARGS, 3, False),
    torch.conv_transpose1d: (_CONV_T_ARGS, 1, True),
    torch.conv_transpose2d: (_CONV_T_ARGS, 2, True),
    torch.conv_transpose3d: (_CONV_T_ARGS, 3, True),
}

def register_layer(cls: type[nn.Module], like: type[nn.Module] = nn.Conv2d) -> type[nn.Module]:
    """Fold into and out of modules of type ``cls`` as into ``like`` (``nn.Linear``, ``nn.ConvNd`` or
    ``nn.ConvTransposeNd``).

    For a user's subclass kept as a leaf by a custom tracer, or a layer of the user's with
    ``like``'s attributes (``weight``, ``bias``, ``stride``, ``padding``, ``dilation``, ``groups``,
    ``padding_mode``, ``output_padding``) and function; a folded call becomes a fused ``like``
    layer (its own ``forward`` is not run). Returns ``cls``.
    """
    if like not in LINEAR_MODULES:
        raise ValueError(f"{like.__name__} is not a layer type fxcanon folds into")
    LINEAR_MODULES[cls] = LINEAR_MODULES[like]
    return cls


def get_attr_value(gm: GraphModule, target: str) -> Any:
    """The object a ``get_attr`` target names."""
    return functools.reduce(getattr, target.split("."), gm)


def call_input(node: Node) -> Any:
    """The first argument of a call, passed by position or by keyword (``bn(input=x)``)."""
    if node.args:
        return node.args[0]
    return node.kwargs.get("input", next(iter(node.kwargs.values()), None))


def has_hooks(module: nn.Module | None) -> bool:
    """True if calling ``module`` runs forward or forward-pre hooks (its own or global ones):
    folding it away would drop them."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks)


def bind_args(node: Node, names: tuple[str, ...]) -> dict[str, Any]:
    """Positional and keyword arguments of ``node`` by parameter name."""
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def tensor_rank(node: Node) -> int | None:
    """Rank of the tensor ``node`` produced when shapes were propagated, else None."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return None if shape is None else len(shape)


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value) if len(value) == n else tuple(int(value[0]) for _ in range(n))
    return tuple(int(value) for _ in range(n))


def _param(gm: GraphModule, value: Any, graph_params: bool) -> Tensor | None:
    """A parameter argument: a ``get_attr`` node, a constant tensor or None; else raise KeyError.

    With ``graph_params``, a parameter that is a graph input or computed in the graph (as in
    ``torch.compile`` graphs) is described by a meta tensor of its recorded shape and dtype.
    """
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, Node) and value.op == "get_attr":
        tensor = get_attr_value(gm, str(value.target))
        if isinstance(tensor, Tensor):
            return tensor
    if graph_params and isinstance(value, Node):
        meta = value.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return torch.empty(meta.shape, dtype=meta.dtype, device="meta")
    raise KeyError("parameter is computed in the graph")


@dataclass(frozen=True)
class LinearView:
    """A Linear, ConvNd or ConvTransposeNd layer, however it is spelled."""

    node: Node
    input: Node
    weight: Tensor
    bias: Tensor | None
    spatial_dims: int  # 0 for Linear
    transposed: bool
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    output_padding: tuple[int, ...] = ()
    module: nn.Module | None = None
    bias_kernel: Tensor | None = None
    pad_kernel: Tensor | None = None
    input_pad: tuple[int, ...] = ()
    extra_args: tuple[Any, ...] = field(default=())  # e.g. ConvTranspose's output_size
    args: dict[str, Any] = field(default_factory=dict)  # a functional call's arguments by name

    @property
    def kind(self) -> str:
        if self.spatial_dims == 0:
            return "linear"
        return f"conv_transpose{self.spatial_dims}d" if self.transposed else f"conv{self.spatial_dims}d"

    @property
    def in_channels(self) -> int:
        if self.spatial_dims == 0:
            return self.weight.shape[1]
        return self.weight.shape[0] if self.transposed else self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups if self.transposed else self.weight.shape[0]

    @property
    def batched_rank(self) -> int:
        """Rank of a batched input whose channel axis is dim 1 (Linear: 2, its feature axis last)."""
        return self.spatial_dims + 2

    @property
    def zero_padded(self) -> bool:
        """True if some output position sees implicit zero padding of the input."""
        if self.spatial_dims == 0 or self.padding_mode != "zeros":
            return False
        if self.padding == "valid":
            return False
        if self.padding == "same":
            return any(k > 1 for k in self.weight.shape[2:])
        return any(int(p) > 0 for p in self.padding)


def linear_view(gm: GraphModule, node: Node, graph_params: bool = False) -> LinearView | None:
    """View ``node`` as a linear-like layer, or None if it is not one fxcanon can rewrite.

    Parameters must be constants (modules, ``get_attr``) unless ``graph_params`` (see ``_param``).
    """
    if node.op == "call_module":
        module: Any = submodule(gm, str(node.target))  # a layer module: duck-typed attributes
        dims_transposed = LINEAR_MODULES.get(type(module))
        if dims_transposed is None or not isinstance(call_input(node), Node):
            return None
        dims, transposed = dims_transposed
        common = {"node": node, "input": call_input(node), "weight": module.weight, "bias": module.bias,
                  "spatial_dims": dims, "transposed": transposed, "module": module,
                  "extra_args": tuple(node.args[1:])}
        if dims == 0:
            return LinearView(**common)
        return LinearView(
            **common, stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation), groups=module.groups, padding_mode=module.padding_mode,
            output_padding=tuple(module.output_padding) if transposed else (),
            bias_kernel=getattr(module, "bias_kernel", None), pad_kernel=getattr(module, "pad_kernel", None),
            input_pad=tuple(getattr(module, "input_pad", ())),
        )
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        names, dims, transposed = LINEAR_FUNCTIONS[node.target]
        args = bind_args(node, names)
        try:
            weight, bias = (_param(gm, args.get(k), graph_params) for k in ("weight", "bias"))
        except KeyError:
            return None
        if not isinstance(args.get("input"), Node) or weight is None:
            return None
        if dims == 0:
            return LinearView(node=node, input=args["input"], weight=weight, bias=bias, spatial_dims=0,
                              transposed=False, args=args)
        padding = args.get("padding", 0)
        return LinearView(
            node=node, input=args["input"], weight=weight, bias=bias, spatial_dims=dims, transposed=transposed,
            stride=_ntuple(args.get("stride", 1), dims),
            padding=padding if isinstance(padding, str) else _ntuple(padding, dims),
            dilation=_ntuple(args.get("dilation", 1), dims), groups=int(args.get("groups", 1)),
            output_padding=_ntuple(args.get("output_padding", 0), dims) if transposed else (), args=args,
        )
    return None


@dataclass(frozen=True)
class BatchNormView:
    """A norm call that may be a per-channel affine map (a source of ``fxcanon.kinds``): statistics,
    affine parameters and mode, however it is spelled. ``running_mean`` and ``running_var`` are
    None when the call normalizes with statistics of its input outside training mode."""

    node: Node  # the normalized tensor: the call, or the element of its tuple result
    input: Node
    name: str
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float | Node  # a graph input under torch.compile(dynamic=True)
    training: bool
    accepted_ranks: tuple[int, ...] | None  # ranks the call itself enforces
    args: dict[str, Any] = field(default_factory=dict)  # a functional call's arguments by name
    module: nn.Module | None = None
    kind: NormKind = BATCH_NORM
    call: Node | None = None  # the call, when ``node`` is an element of its tuple result

    @property
    def num_features(self) -> int:
        return next(t.shape[0] for t in (self.running_mean, self.running_var, self.weight, self.bias)
                    if t is not None)

    def input_rank(self) -> int | None:
        """The rank of the normalized tensor, when it is known."""
        rank = tensor_rank(self.input)
        if rank is not None:
            return rank
        ranks = self.accepted_ranks
        return ranks[0] if ranks is not None and len(ranks) == 1 else None


def _tuple_element(node: Node) -> tuple[Node, int] | None:
    """``(call, i)`` if ``node`` is ``call[i]`` and the only use of ``call``, else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    call, index = node.args
    return (call, index) if isinstance(call, Node) and isinstance(index, int) and len(call.users) == 1 else None


def submodule(root: nn.Module, target: str) -> nn.Module:
    """``root.get_submodule(target)`` through the modules' child dicts: an order of magnitude
    faster (passes look modules up thousands of times); anything off that path (a missing name,
    a child that is None) goes to ``get_submodule``, with its errors."""
    module: nn.Module | None = root
    try:
        for atom in target.split(".") if target else ():
            module = module._modules[atom]  # type: ignore[union-attr]
    except (KeyError, AttributeError):
        module = None
    return root.get_submodule(target) if module is None else module


class Submodules(dict):
    """``gm``'s submodules by name, starting from ``known`` (e.g. ``gm.named_modules()``); a name
    not known yet is looked up in ``gm`` when first asked for (``get``: None if ``gm`` has none)."""

    def __init__(self, gm: GraphModule, known: Iterable[tuple[str, nn.Module]] = ()) -> None:
        super().__init__(known)
        self.gm = gm

    def __missing__(self, target: str) -> nn.Module | None:
        try:
            module: nn.Module | None = submodule(self.gm, target)
        except AttributeError:
            module = None
        self[target] = module
        return module

    def get(self, target: str, default: Any = None) -> Any:
        module = self[target]
        return default if module is None else module


def never_a_norm(node: Node, modules: dict[str, nn.Module]) -> bool:
    """True if ``node`` is no norm source whatever its arguments become: its op, function or module
    type is none (``modules`` as for :func:`batchnorm_view`). A sweep may skip such nodes for good."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return module is None or module_kind(module) is None
    if node.op == "call_function":
        return node.target is not operator.getitem and function_kind(node.target) is None
    return True


def batchnorm_view(gm: GraphModule, node: Node, graph_params: bool = False,
                   modules: dict[str, nn.Module] | None = None) -> BatchNormView | None:
    """View ``node`` as a norm source (``fxcanon.kinds``), or None (``graph_params``: see ``_param``).

    A spelling that returns a tuple is viewed at the element that is the normalized tensor.
    ``modules``: ``dict(gm.named_modules())`` when the caller has it (a sweep over the graph that
    folds as it goes replaces layers, never norms; a module call not in it is no norm).
    """
    if node.op == "call_module":
        target = str(node.target)
        module: Any = submodule(gm, target) if modules is None else modules.get(target)
        kind = None if module is None else module_kind(module)
        if module is None or kind is None or not isinstance(call_input(node), Node):
            return None
        tracks = kind.tracks(module)
        return BatchNormView(
            node=node, input=call_input(node), name=target,
            running_mean=module.running_mean if tracks else None, running_var=module.running_var if tracks else None,
            weight=module.weight, bias=module.bias, eps=module.eps, training=module.training,
            accepted_ranks=kind.modules[type(module)], module=module, kind=kind,
        )
    element = _tuple_element(node)
    call = node if element is None else element[0]
    found = function_kind(call.target) if call.op == "call_function" else None
    if found is None or found[1].output != (None if element is None else element[1]):
        return None
    kind, spelling = found
    args = {**spelling.defaults, **bind_args(call, spelling.args)}
    try:
        tensors = {k: _param(gm, args.get(k), graph_params) for k in ("running_mean", "running_var", "weight", "bias")}
    except KeyError:
        return None
    flag = args.get(kind.flag)
    if not isinstance(args.get("input"), Node) or not isinstance(flag, bool):
        return None
    training = flag == kind.flag_selects and kind.flag_is_training
    if flag == kind.flag_selects and not training:
        tensors.update(running_mean=None, running_var=None)
    eps = args.get("eps")
    if not (isinstance(eps, (int, float)) or (graph_params and isinstance(eps, Node))):
        return None
    return BatchNormView(node=node, input=args["input"], name=call.name,
                         eps=float(eps) if isinstance(eps, (int, float)) else eps, training=training,
                         accepted_ranks=None, args=args, kind=kind, call=None if element is None else call,
                         running_mean=tensors["running_mean"], running_var=tensors["running_var"],
                         weight=tensors["weight"], bias=tensors["bias"])


@dataclass(frozen=True)
class AffineTailView:
    """A LayerNorm or GroupNorm call whose affine tail ``g * n + b`` has one weight per feature of
    ``kind.axis`` (``fxcanon.kinds.AffineTailKind``)."""

    node: Node
    input: Node
    weight: Tensor
    bias: Tensor | None
    kind: AffineTailKind
    args: dict[str, Any] = field(default_factory=dict)  # a functional call's arguments by name
    module: nn.Module | None = None


def affine_tail_view(gm: GraphModule, node: Node) -> AffineTailView | None:
    """View ``node`` as a norm with a per-feature affine tail, or None."""
    module: Any = None
    args: dict[str, Any] = {}
    weight: Tensor | None
    bias: Tensor | None
    if node.op == "call_module":
        module = submodule(gm, str(node.target))
        kind = next((k for k in AFFINE_TAIL_KINDS if type(module) in k.modules), None)
        if kind is None:
            return None
        data, weight, bias = call_input(node), module.weight, module.bias
    elif node.op == "call_function":
        target = node.target
        kind = next((k for k in AFFINE_TAIL_KINDS if target in k.functions), None)
        if kind is None or isinstance(target, str):
            return None
        spelling = kind.functions[target]
        args = {**spelling.defaults, **bind_args(node, spelling.args)}
        try:
            weight, bias = (_param(gm, args.get(k), False) for k in ("weight", "bias"))
        except KeyError:
            return None
        data = args.get("input")
    else:
        return None
    if not isinstance(data, Node) or not isinstance(weight, Tensor) or weight.dim() != 1:
        return None
    return AffineTailView(node, data, weight, bias, kind, args, module)


@dataclass(frozen=True)
class ConstantPadView:
    """``F.pad(x, pad, mode="constant", value=v)`` or a ``ConstantPadNd``/``ZeroPad`` module."""

    node: Node
    input: Node
    pad: tuple[int, ...]
    value: float


PAD_FUNCTIONS = {F.pad, torch._C._nn.pad}  # the second is what torch.compile graphs call
_PAD_MODULES = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)


def constant_pad_view(gm: GraphModule, node: Node) -> ConstantPadView | None:
    """View ``node`` as constant padding, or None."""
    if node.op == "call_module":
        module = submodule(gm, str(node.target))
        if not isinstance(module, _PAD_MODULES):
            return None
        if not isinstance(call_input(node), Node):
            return None
        return ConstantPadView(node, call_input(node), tuple(module.padding), float(module.value))
    if node.op == "call_function" and node.target in PAD_FUNCTIONS:
        args = bind_args(node, ("input", "pad", "mode", "value"))
        if args.get("mode", "constant") != "constant" or not isinstance(args.get("input"), Node):
            return None
        pad = args.get("pad")
        if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
            return None
        return ConstantPadView(node, args["input"], tuple(pad), float(args.get("value") or 0.0))
    return None


def check_batchnorm(bn: BatchNormView, allow_training: bool, values: bool = True) -> Refusal | None:
    """Raise for norms that must not be canonized silently; return why one is left, or None.
    ``values``: also check the statistics and parameters themselves (NaN, Inf, variance + eps <= 0)."""
    kind = bn.kind.name
    if bn.running_mean is None or bn.running_var is None:
        return bn.kind.without_statistics
    if bn.training:
        if not allow_training:
            raise CanonizationError(
                f"{kind} {bn.name!r} is in training mode; call model.eval() before canonicalize "
                f"(or pass allow_training=True to leave training-mode {kind}s untouched)"
            )
        return Refusal(TRAINING, "training mode: normalizes with batch statistics")
    if not (isinstance(bn.eps, (int, float)) and math.isfinite(bn.eps) and bn.eps >= 0):
        raise CanonizationError(f"{kind} {bn.name!r} has eps={bn.eps}: it must be a finite number >= 0")
    if not values:
        return None
    named = [(label, tensor) for label, tensor in (("running_mean", bn.running_mean), ("running_var", bn.running_var),
                                                   ("weight", bn.weight), ("bias", bn.bias)) if tensor is not None]
    device = bn.running_var.device
    if not all_finite([tensor.detach().reshape(-1).to(device, torch.float64) for _, tensor in named]):
        label = next((label for label, tensor in named if not torch.isfinite(tensor).all()), None)
        if label is not None:
            raise CanonizationError(f"{kind} {bn.name!r} has NaN or Inf in its {label}")
    if not variance_positive(bn.running_var.detach().double(), bn.eps):
        raise CanonizationError(f"{kind} {bn.name!r} has running_var + eps <= 0")
    return None


def all_finite(values: list[Tensor]) -> bool:
    """True if every value of these float64 tensors is finite, by one sum each: a float64 sum is
    finite iff every value is (values converted from lower precision cannot overflow it). A False
    for float64 values of astronomic size is checked value by value by the caller."""
    return math.isfinite(float(sum((v.sum() for v in values), torch.zeros((), dtype=torch.float64))))


def variance_positive(var: Tensor, eps: float | Tensor) -> bool:
    """True if ``var + eps > 0`` everywhere (float64 ``var``; ``eps`` a number or one per channel)."""
    return not var.numel() or float((var + eps).min()) > 0


_METADATA_METHODS = {"size", "dim", "numel"}
_METADATA_ARG_METHODS = {"to", "type_as", "expand_as", "new_zeros", "new_ones", "new_full", "new_empty"}
_LIKE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}


def shape_holds(x: Tensor, rank: int, sizes: tuple[tuple[int, int], ...]) -> bool:
    """True if ``x`` has rank ``rank`` and size ``n`` at every ``(dim, n)`` of ``sizes`` (the
    condition of a guard, see ``fxcanon.guards``)."""
    return x.dim() == rank and all(x.shape[d] == n for d, n in sizes)


def reads_only_metadata(node: Node, value: Node) -> bool:
    """True if ``node`` uses ``value`` only for its shape, dtype or device (``x.size(0)``,
    ``c.to(x)``, ``torch.zeros_like(x)``): such uses are unaffected by folding ``value``'s producer."""
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    if node.op == "call_method" and node.target in _METADATA_ARG_METHODS:
        return node.args[0] is not value
    if node.op == "call_function" and (node.target in _LIKE_FUNCTIONS or node.target is shape_holds):
        return True
    return (node.op == "call_function" and node.target is getattr
            and len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device"))


_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}


def relu_input(gm: GraphModule, node: Node) -> Node | None:
    """The input of ``node`` if it is a plain ReLU (module, function or method), else None."""
    if node.op == "call_module" and type(submodule(gm, str(node.target))) is nn.ReLU:
        return call_input(node)
    if (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or \
            (node.op == "call_method" and node.target in ("relu", "relu_")):
        return call_input(node)
    return None


_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def identity_input(gm: GraphModule, node: Node) -> Node | None:
    """The input of ``node`` if it returns its input unchanged (``nn.Identity``, dropout in eval
    mode, ``F.dropout(training=False)``) and runs no hooks, else None."""
    if node.op == "call_module":
        module = submodule(gm, str(node.target))
        if isinstance(module, nn.Identity) or (isinstance(module, _DROPOUT_MODULES) and not module.training):
            return None if has_hooks(module) else call_input(node)
    if node.op == "call_function" and node.target is F.dropout:
        args = bind_args(node, ("input", "p", "training", "inplace"))
        return args.get("input") if args.get("training", True) is False else None
    return None


def relu_after(gm: GraphModule, node: Node) -> tuple[Node, list[Node]] | None:
    """``(relu, between)`` if ``node``'s only use is a plain ReLU, possibly through identity ops
    (timm's norm-act layers: norm -> drop -> act), each the only use of the one before."""
    between: list[Node] = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if relu_input(gm, user) is node:
            return user, between
        if identity_input(gm, user) is not node:
            return None
        between.append(user)
        node = user
    return None

