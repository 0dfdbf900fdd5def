"""The canonization report: where each BatchNorm went, or why it was left."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.fx import GraphModule

REPORT_KEY = "fxcanon_report"

# Fold rules, as they appear in reports and in the command line's summary.
FORWARD = "forward"  # Linear/Conv -> BN (A.1-A.5)
BACKWARD_VECTOR = "backward, vector bias"  # BN -> Linear/Conv without zero padding (A.6-A.9)
BACKWARD_BIAS_MAP = "backward, bias map"  # BN -> zero-padded Conv / ConvTranspose (A.10-A.20)
THROUGH_LAYOUT = "through layout"  # BN -> layout ops / concat -> Linear/Conv (A.21-A.26)
THRESHOLD = "threshold"  # BN -> ReLU -> (layout ops) -> Linear/Conv (section 5)
IDENTITY_BRANCH = "identity branch"  # layer(x) + BN(x) -> layer'(x) (RepVGG-style blocks)
PRECOMPUTED = "precomputed"  # BN of parameters only (weight standardization): a constant

# Refusal codes: why (part of) a norm stays. Passes and the command line match these, never messages.
HOOKS = "hooks"  # the norm module has forward hooks
TRAINING = "training"  # normalizes with batch statistics: training mode
NO_RUNNING_STATISTICS = "no running statistics"  # a BatchNorm without running statistics
PER_SAMPLE_STATISTICS = "per-sample statistics"  # an InstanceNorm with input statistics: never a fixed map
GRAPH_INPUTS = "graph inputs"  # statistics or parameters are not inputs of a torch.compile graph
NOT_AFTER_LAYER = "not after a layer"
NOT_BEFORE_LAYER = "not before a layer"
KEPT_FOR_USERS = "kept for users"  # folded into some users, kept for the others
NOT_THROUGH_RELU = "not through its ReLU"
NO_SIBLING_LAYER = "no sibling layer"  # an identity branch without a layer to take it
NOT_CONSTANT = "not constant"  # computed from parameters alone, but not safely precomputed
UNREAD = "unread"  # no pass can read the call
INSIDE = "inside"  # run inside a leaf module or a nested GraphModule


@dataclass(frozen=True)
class Refusal:
    """Why (part of) a norm stays: a ``code`` to match on and the ``message`` the report prints."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Fold:
    """One BatchNorm folded into one layer."""

    into: str  # node name of the fused layer
    rule: str
    path: tuple[str, ...] = ()  # nodes between the BatchNorm and the layer
    inputs: str = ""  # the layer's input columns/channels that changed, e.g. "0:24, 26:50"

    def describe(self) -> str:
        via = f" via {' -> '.join(self.path)}" if self.path else ""
        inputs = f" inputs {self.inputs}" if self.inputs else ""
        return f"{self.into}{inputs} ({self.rule}){via}"


def fold_record(into: str, sink: Any, vector_bias: bool, rule: str | None = None) -> Fold:
    """The report line for a fold into ``sink`` (an ``fxcanon.affine.Sink``)."""
    if rule is None:
        rule = THROUGH_LAYOUT if sink.path else BACKWARD_VECTOR if vector_bias else BACKWARD_BIAS_MAP
    channels = len(sink.channel_map)
    if sink.identity or bool(sink.channel_map.ge(0).all()):  # every input channel from the BatchNorm
        changed = f"0:{channels}" if channels else ""
    else:
        changed = index_ranges(sink.channel_map.ge(0).nonzero().flatten())
    path = sink.path + ((sink.pad.node.name,) if sink.pad is not None else ())
    return Fold(into, rule, path, changed)


def index_ranges(indices: Tensor) -> str:
    """``tensor([0, 1, 2, 5])`` (increasing) -> ``"0:3, 5:6"`` (half-open ranges, as in the supplement)."""
    if not indices.numel():
        return ""
    ends = ((indices[1:] != indices[:-1] + 1).nonzero().flatten() + 1).tolist()
    values = indices.tolist()
    return ", ".join(f"{values[a]}:{values[b - 1] + 1}" for a, b in zip([0, *ends], [*ends, len(values)]))


@dataclass
class Entry:
    """What happened to one BatchNorm call."""

    batchnorm: str  # node name
    source: str = ""  # module path, when the BatchNorm is a module
    folds: list[Fold] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)  # non-empty when (part of) the BatchNorm stays
    guards: list[str] = field(default_factory=list)  # conditions checked at call time

    @property
    def left_reason(self) -> str | None:
        """Why (part of) the BatchNorm stays, as the report prints it; None if it is gone."""
        return "; ".join(r.message for r in self.refusals) if self.refusals else None

    def refused(self, code: str) -> bool:
        """True if some refusal of this entry has ``code``."""
        return any(r.code == code for r in self.refusals)

    @property
    def status(self) -> str:
        if self.left_reason is None:
            return "folded"
        return "partly folded" if self.folds else "left"


@dataclass
class Report:
    """Per-BatchNorm outcome of :func:`fxcanon.canonicalize`, printable as a table."""

    entries: dict[str, Entry] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def entry(self, batchnorm: str, source: str = "") -> Entry:
        return self.entries.setdefault(batchnorm, Entry(batchnorm, source))

    @property
    def left(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.left_reason is not None]

    def rule_counts(self) -> Counter[str]:
        return Counter(fold.rule for e in self.entries.values() for fold in e.folds)

    def table(self) -> str:
        rows = [("batchnorm", "status", "where it went / why it stays")]
        for e in self.entries.values():
            detail = "; ".join(f.describe() for f in e.folds)
            if e.guards:
                detail += "".join(f"; guarded: {g}" for g in e.guards)
            if e.left_reason is not None:
                detail = f"{detail}; left: {e.left_reason}" if detail else e.left_reason
            name = e.batchnorm if e.source in ("", e.batchnorm) else f"{e.batchnorm} ({e.source})"
            rows.append((name, e.status, detail))
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
        lines.insert(1, "-" * min(100, max(len(line) for line in lines)))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def __str__(self) -> str:
        return self.table()


def get_report(gm: GraphModule) -> Report:
    """The report attached to a canonized GraphModule (empty if it has none)."""
    return gm.meta.setdefault(REPORT_KEY, Report())
