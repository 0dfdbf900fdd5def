"""How a planned fold is written into the graph: two strategies behind one interface.

The passes decide *what* to fold (analysis in ``fxcanon.affine``); a folder decides *how*:

* :class:`ModuleFolder` (``canonicalize``) computes fused tensors now, from the constants the
  graph holds, and installs fused layer modules (``fxcanon.modules``);
* :class:`GraphFolder` (the ``torch.compile`` backend) emits the same fold math as graph
  computations of the parameters the graph receives as inputs, so whatever weights arrive at run
  time are folded: no stale constants across instances, ``load_state_dict`` or in-place updates.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from .affine import ForwardFold, Sink
from .errors import CanonizationError
from .fold_math import batchnorm_affine, fold_into_output, fused_input, fused_output, relu_factorization
from .modules import ThresholdReLU, conv_bias_map, threshold_relu
from .report import GRAPH_INPUTS, TRAINING, Fold, Refusal, fold_record
from .rewrite import Deferred, fold_sink, fresh_name
from .views import (LINEAR_FUNCTIONS, BatchNormView, LinearView, Submodules, all_finite, check_batchnorm,
                    variance_positive)


@dataclasses.dataclass
class Affine:
    """A BatchNorm's ``(s, t)``: float64 tensors (module folder) or graph nodes (graph folder).

    ``scale`` is the numeric ``s`` when known at rewrite time (None in graphs), for the analysis;
    ``factors`` its ReLU factorization (``relu_factorization``) when computed ahead.
    """

    s: Any
    t: Any
    scale: Tensor | None
    factors: tuple[Tensor, Tensor, Tensor] | None = None


@dataclasses.dataclass
class _GraphState:
    """What a folder knows of the graph module it folds in (see :meth:`_Folder.norm_modules`)."""

    graph_module: weakref.ref[GraphModule]
    modules: Submodules
    no_norms: set[Node] = dataclasses.field(default_factory=set)
    built: weakref.WeakSet[nn.Module] = dataclasses.field(default_factory=weakref.WeakSet)
    deferred: Deferred = dataclasses.field(default_factory=Deferred)


class _Folder:
    """What both folders share: the submodules of the graph module they fold in."""

    def __init__(self) -> None:
        self._seen: _GraphState | None = None

    def _state(self, gm: GraphModule) -> _GraphState:
        if self._seen is None or self._seen.graph_module() is not gm:
            if self._seen is not None:  # nothing deferred is left behind
                self._seen.deferred.flush()
            self._seen = _GraphState(weakref.ref(gm), Submodules(gm, gm.named_modules(remove_duplicate=False)))
        return self._seen

    def norm_modules(self, gm: GraphModule) -> tuple[Submodules, set[Node]]:
        """``gm``'s modules as this folder first saw them (names added since are looked up), and the
        nodes found to be no norm source for good (:func:`fxcanon.views.never_a_norm`): enough to
        tell which calls run a norm, since passes replace layers and add modules, never norms."""
        state = self._state(gm)
        return state.modules, state.no_norms

    def built(self, gm: GraphModule) -> weakref.WeakSet[nn.Module]:
        """The fused layers this folder made for ``gm``: a later fold into one updates it in place."""
        return self._state(gm).built

    def prefetch(self, views: list[BatchNormView], allow_training: bool) -> None:
        """Prepare the affine maps of ``views`` before they are asked for one by one (no-op here)."""

    def flush(self, gm: GraphModule) -> None:
        """Compute the folds into ``gm``'s layers this folder deferred (:class:`fxcanon.rewrite.Deferred`):
        before anything reads the layers' tensors other than through this folder."""
        if self._seen is not None and self._seen.graph_module() is gm:
            self._seen.deferred.flush()


class ModuleFolder(_Folder):
    """Fold the values the graph holds now into new fused modules.

    Each BatchNorm's affine map is computed once for all passes sharing the folder, again only
    when one of its tensors is replaced or changed in place (its version counter moves). Folds
    into layers are deferred until :meth:`flush` (:class:`fxcanon.rewrite.Deferred`), which
    :func:`fxcanon.canonicalize.run_passes` and :meth:`CanonizationPass.run` call."""

    graph_params = False

    def __init__(self) -> None:
        super().__init__()
        self._affines: dict[tuple[Any, ...], tuple[tuple[Tensor | None, ...], Affine | Refusal]] = {}

    def affine(self, gm: GraphModule, bn: BatchNormView, allow_training: bool) -> Affine | Refusal:
        """The BatchNorm's affine map, or why it stays (raises for bad statistics and training mode)."""
        key = _key(bn, allow_training)
        if key not in self._affines:
            self._affines[key] = (_tensors(bn), self._affine(bn, allow_training))
        return self._affines[key][1]

    def prefetch(self, views: list[BatchNormView], allow_training: bool) -> None:
        """Compute the affine maps of ``views`` not known yet in one batch: each step one op over
        all their channels (the same float64 values, element by element, as one at a time). Where
        a value check fails, nothing is stored: :meth:`affine` then says which BatchNorm and why."""
        todo: dict[tuple[Any, ...], BatchNormView] = {}
        for bn in views:
            key = _key(bn, allow_training)
            if key in self._affines or key in todo:
                continue
            try:
                reason = check_batchnorm(bn, allow_training, values=False)
            except CanonizationError:  # raised in order by affine(), after the BatchNorms before it
                break
            if reason is None:
                todo[key] = bn
        device = next((bn.running_var.device for bn in todo.values() if bn.running_var is not None), None)
        batch = {key: bn for key, bn in todo.items()
                 if all(t is None or t.device == device for t in _tensors(bn))}
        if len(batch) < 2:
            return
        parts: list[list[Tensor]] = [[], [], [], []]
        for bn in batch.values():  # checked: running statistics present, eps a number
            mean = cast(Tensor, bn.running_mean).reshape(-1)
            for part, tensor, missing in zip(parts, _tensors(bn), (0.0, 0.0, 1.0, 0.0)):
                part.append(mean.new_full(mean.shape, missing) if tensor is None else
                            tensor if tensor.dim() == 1 else tensor.reshape(-1))
        mean, var, gamma, beta = stats = [torch.cat(part).detach().double() for part in parts]
        sizes = [len(t) for t in parts[0]]
        eps_values = [cast(float, bn.eps) for bn in batch.values()]
        eps: float | Tensor = eps_values[0] if len(set(eps_values)) == 1 else torch.repeat_interleave(
            torch.tensor(eps_values, dtype=torch.float64, device=device), torch.tensor(sizes, device=device))
        if not (all_finite(stats) and variance_positive(var, eps)):
            return
        s, t = batchnorm_affine(mean, var, gamma, beta, eps)
        split = [tensor.split(sizes) for tensor in (s, t, *relu_factorization(s, t))]
        for (key, bn), (s_bn, t_bn, *factors) in zip(batch.items(), zip(*split)):
            self._affines[key] = (_tensors(bn), Affine(s_bn, t_bn, s_bn, tuple(factors)))

    @staticmethod
    def _affine(bn: BatchNormView, allow_training: bool) -> Affine | Refusal:
        reason = check_batchnorm(bn, allow_training)
        if reason is not None:
            return reason
        # checked: running statistics present, eps a number
        assert bn.running_mean is not None and bn.running_var is not None and not isinstance(bn.eps, Node)
        with torch.no_grad():  # fused tensors keep no autograd link to the caller's parameters
            s, t = batchnorm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps))
        return Affine(s, t, s)

    def supports(self, view: LinearView) -> bool:
        return True

    def supports_sink(self, sink: Sink) -> bool:
        return True

    def fold_output(self, gm: GraphModule, plan: ForwardFold, affine: Affine) -> Node:
        producer = plan.producer
        fold = functools.partial(fold_into_output, s=affine.s, t=affine.t, transposed=producer.transposed,
                                 groups=producer.groups)
        state = self._state(gm)
        return state.deferred.put(gm, producer, fold, producer.input_pad, state.built, defer=True)

    def fold_input(self, gm: GraphModule, sink: Sink, s: Any, t: Any, rule: str | None = None) -> Fold:
        state = self._state(gm)
        return fold_sink(gm, sink, s, t, state.built, state.deferred, rule)

    def threshold(self, gm: GraphModule, bn: BatchNormView, relu: Node, affine: Affine) -> Any:
        """Make ``relu``'s node compute the threshold activation of the BatchNorm's input (its users
        read it as they read the ReLU); returns the shift ``t'`` left for the layers after it."""
        theta, sign, shift = affine.factors or relu_factorization(affine.s, affine.t)
        name = fresh_name(gm, f"{relu.name}_threshold")
        gm.add_submodule(name, ThresholdReLU(theta.to(bn.running_mean, copy=True), sign.to(bn.running_mean, copy=True)))
        relu.op, relu.target, relu.args, relu.kwargs = "call_module", name, (bn.input,), {}
        return shift


def _tensors(bn: BatchNormView) -> tuple[Tensor | None, ...]:
    return bn.running_mean, bn.running_var, bn.weight, bn.bias


def _key(bn: BatchNormView, allow_training: bool) -> tuple[Any, ...]:
    """What an affine map depends on: its tensors (identity and version), eps, mode and kind. The
    cache keeps the tensors alive, so their ids stay theirs."""
    return (_tensor_state(bn.running_mean), _tensor_state(bn.running_var), _tensor_state(bn.weight),
            _tensor_state(bn.bias), bn.eps, bn.training, id(bn.kind), allow_training)


def _tensor_state(tensor: Tensor | None) -> tuple[int, int] | None:
    return None if tensor is None else (id(tensor), tensor._version)


class CachedFold:
    """A fold function memoized for graphs that run eagerly, validated by value on every call.

    Each entry keeps a copy of the tensor arguments it was computed from and is reused only while
    ``torch.equal`` holds for all of them, so no edit goes unseen: in-place updates, edits through
    ``tensor.data``, ``vector_to_parameters`` and running statistics updated by a training-mode
    forward alike. Entries are keyed on the arguments' identities (one per module instance that
    shares the compiled graph). Not cached while gradients are recorded for an argument.
    """

    def __init__(self, fn: Any, size: int = 4) -> None:
        functools.update_wrapper(self, fn)
        self.fn, self.size = fn, size
        self.store: dict[tuple[Any, ...], tuple[list[Tensor], Any]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in args if isinstance(a, Tensor)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.fn(*args, **kwargs)
        key = (torch.is_inference_mode_enabled(), *(id(a) if isinstance(a, Tensor) else a for a in args))
        entry = self.store.get(key)
        if entry is not None and all(_same(t, copy) for t, copy in zip(tensors, entry[0])):
            return entry[1]
        if entry is None and len(self.store) >= self.size:
            self.store.pop(next(iter(self.store)))
        result = self.fn(*args, **kwargs)
        self.store[key] = ([t.clone() for t in tensors], result)
        return result


def _same(tensor: Tensor, copy: Tensor) -> bool:
    """Equal by value, shape, dtype and device."""
    return tensor.shape == copy.shape and tensor.dtype == copy.dtype and tensor.device == copy.device \
        and torch.equal(tensor, copy)


class GraphFolder(_Folder):
    """Emit folds as computations of the parameter nodes (functional layers only).

    With ``cache`` (for graphs run eagerly) each emitted fold of parameters is a :class:`CachedFold`;
    compilers such as inductor get the plain functions to trace (and constant-fold under freezing).
    Bias maps are computed on every call, as in the fused layers (``fxcanon.modules.conv_bias_map``).
    """

    graph_params = True

    def __init__(self, cache: bool = False) -> None:
        super().__init__()
        self.cache = cache

    def _fn(self, fn: Any) -> Any:
        return CachedFold(fn) if self.cache else fn

    def affine(self, gm: GraphModule, bn: BatchNormView, allow_training: bool) -> Affine | Refusal:
        if bn.training:
            return Refusal(TRAINING, "training mode: left for the training graph")
        if bn.running_mean is None or bn.running_var is None:
            return bn.kind.without_statistics
        if bn.node.op != "call_function":
            return Refusal(GRAPH_INPUTS, "module call: parameters are not graph inputs")
        args = [*(bn.args.get(k) for k in ("running_mean", "running_var", "weight", "bias")), bn.eps]
        anchor = _hoist(gm, args)
        if anchor is None:
            return Refusal(GRAPH_INPUTS, "statistics computed inside the graph")
        with gm.graph.inserting_before(anchor.next):
            st = gm.graph.call_function(self._fn(batchnorm_affine), tuple(args))
            s = gm.graph.call_function(operator.getitem, (st, 0))
            t = gm.graph.call_function(operator.getitem, (st, 1))
        return Affine(s, t, None)

    def supports(self, view: LinearView) -> bool:
        return view.module is None and not view.input_pad

    def supports_sink(self, sink: Sink) -> bool:
        """Explicit constant padding before the layer (a pad kernel) is not emitted in graphs."""
        return self.supports(sink.view) and sink.pad is None

    def fold_output(self, gm: GraphModule, plan: ForwardFold, affine: Affine) -> Node:
        view = plan.producer
        with gm.graph.inserting_before(view.node):
            fused = gm.graph.call_function(self._fn(fused_output), (view.args.get("weight"), view.args.get("bias"),
                                                          affine.s, affine.t),
                                           {"transposed": view.transposed, "groups": view.groups})
        _set_parameters(gm, view, fused)
        return view.node

    def fold_input(self, gm: GraphModule, sink: Sink, s: Any, t: Any, rule: str | None = None) -> Fold:
        view = sink.view
        vector = not (view.transposed or view.zero_padded)
        graph = gm.graph
        with graph.inserting_before(view.node):
            fused = graph.call_function(self._fn(fused_input), (view.args.get("weight"), view.args.get("bias"), s, t),
                                        {"channel_map": tuple(sink.channel_map.tolist()),
                                         "transposed": view.transposed, "groups": view.groups,
                                         "vector_bias": vector})
        _set_parameters(gm, view, fused)
        if not vector:
            with graph.inserting_before(view.node.next):
                kernel = graph.call_function(operator.getitem, (fused, 2))
                bias_map = graph.call_function(conv_bias_map, (view.node.args[0], kernel), {
                    "spatial_dims": view.spatial_dims, "transposed": view.transposed, "stride": view.stride,
                    "padding": view.padding, "dilation": view.dilation, "groups": view.groups,
                    "output_padding": view.output_padding})
                total = graph.call_function(operator.add, (view.node, bias_map))
            view.node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        return fold_record(view.node.name, sink, vector, rule)

    def threshold(self, gm: GraphModule, bn: BatchNormView, relu: Node, affine: Affine) -> Any:
        graph = gm.graph
        with graph.inserting_before(relu):
            factors = graph.call_function(self._fn(relu_factorization), (affine.s, affine.t))
            theta, sign, shift = (graph.call_function(operator.getitem, (factors, i)) for i in range(3))
        relu.op, relu.target, relu.args, relu.kwargs = "call_function", threshold_relu, (bn.input, theta, sign), {}
        return shift


def _hoist(gm: GraphModule, args: list[Any]) -> Node | None:
    """A node after which ``args`` are all defined: the last placeholder, with the args computed
    from placeholders alone (``get_attr`` nodes; ``eps.item()`` under dynamic shapes) moved up;
    None if an arg is computed from other nodes."""
    nodes = [a for a in args if isinstance(a, Node) and a.op != "placeholder"]
    if not all(n.op == "placeholder" for a in nodes for n in a.all_input_nodes):
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else next(iter(gm.graph.nodes))
    for node in nodes:
        anchor.append(node)
        anchor = node
    return anchor


def _set_parameters(gm: GraphModule, view: LinearView, fused: Node) -> None:
    """Make the functional call ``view.node`` take weight and bias from ``fused`` (a tuple node)."""
    with gm.graph.inserting_before(fused.next):
        weight = gm.graph.call_function(operator.getitem, (fused, 0))
        bias = gm.graph.call_function(operator.getitem, (fused, 1))
    for new, old in ((weight, view.args.get("weight")), (bias, view.args.get("bias"))):
        if isinstance(old, Node) and "tensor_meta" in old.meta:
            new.meta["tensor_meta"] = old.meta["tensor_meta"]
    if "tensor_meta" not in bias.meta and "tensor_meta" in weight.meta:
        meta = weight.meta["tensor_meta"]
        bias.meta["tensor_meta"] = meta._replace(shape=torch.Size([view.out_channels]))
    names = LINEAR_FUNCTIONS[cast(Callable[..., Any], view.node.target)][0]
    values = {"input": view.node.args[0] if view.node.args else view.node.kwargs["input"], "weight": weight,
              "bias": bias, "stride": view.stride, "padding": view.padding, "dilation": view.dilation,
              "groups": view.groups, "output_padding": view.output_padding}
    view.node.args = tuple(values[name] for name in names)
    view.node.kwargs = {}
