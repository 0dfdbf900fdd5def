"""LRP hyperparameter search per layer group, canonized and not (the supplement's gamma grid search).

    result = search(model, data, groups="auto", grid=(0.0, 0.25, 1.0))
    result.best("rra", canonized=True)          # the configuration with the best mean RRA
    result.save("results/")                      # search.csv/json, marginal curves, best/worst heatmaps

Every configuration of the full grid (LRP-gamma, or LRP-epsilon for groups listed in ``rules``)
is scored on every image with the ``fast`` preset, and every score is kept. The paper compares
configurations metric by metric; :meth:`SearchResult.combined` adds a single objective of our
own (the mean over metrics of each configuration's percentile rank), which is *not* the paper's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .datasets import Data
from .evaluate import as_data, common_arguments, explain_fn, load_task, prepare, score_all
from .metrics import COLUMNS, TABLE_COLUMNS, Preset

PAPER_GAMMAS = (0.0, 0.1, 0.25, 0.5, 1.0, 10.0, 50.0)
DEFAULT_GAMMAS = (0.0, 0.25, 1.0)


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions and fully connected layers in the order the model calls them (graph order if traced)."""
    from zennit.types import Linear

    graph = getattr(model, "graph", None)
    if graph is not None:
        names = [str(n.target) for n in graph.nodes if n.op == "call_module"]
        modules = dict(model.named_modules())
        ordered = [(name, modules[name]) for name in dict.fromkeys(names)]
    else:
        ordered = list(model.named_modules())
    return [(name, module) for name, module in ordered if isinstance(module, Linear)]


def layer_groups(model: nn.Module, groups: str | Mapping[str, Sequence[str]] = "auto") -> dict[str, list[nn.Module]]:
    """Modules per group. ``"auto"``: the convolutions split into thirds by call order (``conv1``,
    ``conv2``, ``conv3``) and the fully connected layers (``classifier``). A mapping names modules or
    module prefixes per group (``{"early": ["layer1"], "fc": ["fc"]}``)."""
    layers = linear_layers(model)
    if groups == "auto":
        convolutions = [m for _, m in layers if not isinstance(m, nn.Linear)]
        parts = np.array_split(np.arange(len(convolutions)), 3)
        found = {f"conv{i + 1}": [convolutions[j] for j in part] for i, part in enumerate(parts) if len(part)}
        found["classifier"] = [m for _, m in layers if isinstance(m, nn.Linear)]
        return {name: modules for name, modules in found.items() if modules}
    if isinstance(groups, str):
        raise ValueError(f"groups must be 'auto' or a mapping, not {groups!r}")
    return {group: [m for name, m in layers if any(name == p or name.startswith(p + ".") for p in prefixes)]
            for group, prefixes in groups.items()}


def group_composite(rules: Mapping[int, Any], stabilizer: float = 1e-6) -> Any:
    """A zennit composite with the hook ``rules[id(module)]`` on those modules and the defaults
    elsewhere (fxcanon's Sum/Gate rules, zennit's base layer map). Identity, not names: the same
    composite serves the model inside wrappers and both of its canonized forms."""
    from zennit.composites import layer_map_base
    from zennit.core import Composite

    from .xai import _fxcanon_map

    default = _fxcanon_map(stabilizer) + layer_map_base(stabilizer)

    def module_map(ctx: dict, name: str, module: nn.Module) -> Any:
        if id(module) in rules:
            return rules[id(module)]
        return next((hook for types, hook in default if isinstance(module, types)), None)

    return Composite(module_map=module_map)


def configuration_rules(groups: Sequence[Mapping[str, list[nn.Module]]], values: Mapping[str, float],
                        kinds: Mapping[str, str], stabilizer: float = 1e-6) -> dict[int, Any]:
    """Hooks by module identity: LRP-gamma (or epsilon where ``kinds[group] == "epsilon"``) per group;
    a fused layer's bias map acts as its position-dependent bias under the rule (``fxcanon.xai``)."""
    from zennit.rules import Epsilon, Gamma

    from .xai import with_bias_maps

    rules: dict[int, Any] = {}
    for group_map in groups:
        for group, modules in group_map.items():
            value = values[group]
            hook = with_bias_maps(Epsilon(epsilon=value) if kinds.get(group) == "epsilon"
                                  else Gamma(gamma=value, stabilizer=stabilizer))
            rules.update({id(m): hook for m in modules})
    return rules


@dataclass
class SearchResult:
    """Every configuration's per-image scores, mean scores and explanations, canonized and not."""

    groups: tuple[str, ...]
    configurations: list[dict[str, float]]
    records: list[dict[str, Any]]
    explanations: dict[tuple[int, bool], np.ndarray] = field(repr=False)
    columns: tuple[str, ...] = TABLE_COLUMNS
    meta: dict[str, Any] = field(default_factory=dict)

    def means(self) -> np.ndarray:
        """Mean scores, shape (configurations, 2 [not canonized, canonized], columns), NaN ignored."""
        table = np.full((len(self.configurations), 2, len(self.columns)), np.nan)
        sums: dict[tuple[int, bool], list[dict[str, Any]]] = {}
        for r in self.records:
            sums.setdefault((r["explainer"], r["canonized"]), []).append(r)
        for (index, canonized), rows in sums.items():
            for k, c in enumerate(self.columns):
                values = np.array([r.get(c, np.nan) for r in rows], float)
                if np.isfinite(values).any():
                    table[index, int(canonized), k] = np.nanmean(values)
        return table

    def _column(self, metric: str) -> int:
        return self.columns.index(metric)

    def median(self, metric: str, canonized: bool) -> float:
        """Median over configurations of the mean score: how good a configuration is typically."""
        return float(np.nanmedian(self.means()[:, int(canonized), self._column(metric)]))

    def best(self, metric: str, canonized: bool, worst: bool = False) -> tuple[dict[str, float], float]:
        """The configuration with the best (or worst) mean score for ``metric``, and that score."""
        scores = self.means()[:, int(canonized), self._column(metric)]
        better = COLUMNS[metric].higher_is_better != worst
        index = int(np.nanargmax(scores) if better else np.nanargmin(scores))
        return self.configurations[index], float(scores[index])

    def combined(self) -> np.ndarray:
        """Our own single objective (not the paper's): per configuration and canonized no/yes, the mean
        over metrics of the percentile rank among all configurations of both forms (1 = best)."""
        means = self.means().reshape(-1, len(self.columns))
        ranks = np.full(means.shape, np.nan)
        for k, c in enumerate(self.columns):
            values = means[:, k] if COLUMNS[c].higher_is_better else -means[:, k]
            finite = np.isfinite(values)
            if finite.sum() > 1:
                ranks[finite, k] = values[finite].argsort().argsort() / (finite.sum() - 1)
        return np.nanmean(ranks, 1).reshape(len(self.configurations), 2)

    def summary(self) -> str:
        """Markdown: per metric the median and the best configuration, not canonized vs canonized."""
        lines = ["| metric | median: no | yes | best: no | yes | best configuration (canonized) |", "|---" * 6 + "|"]
        for c in self.columns:
            if np.isnan(self.means()[:, :, self._column(c)]).all():
                continue
            (_, best_no), (config, best_yes) = self.best(c, False), self.best(c, True)
            lines.append(f"| {COLUMNS[c].arrow} {COLUMNS[c].name} | {self.median(c, False):.2f} | "
                         f"{self.median(c, True):.2f} | {best_no:.2f} | {best_yes:.2f} | {_label(config)} |")
        combined = self.combined()
        for canonized in (False, True):
            index = int(np.nanargmax(combined[:, int(canonized)]))
            lines.append(f"\nBest by the combined rank objective (ours, not the paper's), "
                         f"{'canonized' if canonized else 'not canonized'}: {_label(self.configurations[index])} "
                         f"({combined[index, int(canonized)]:.2f})")
        return "\n".join(lines)

    def save(self, out: str | Path, prefix: str = "") -> list[Path]:
        """Write ``search.md``, ``search.csv``, ``search.json``, ``search_curves.png``, ``search_heatmaps.png``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{prefix}search{suffix}" for suffix in (".md", ".csv", ".json", "_curves.png",
                                                                 "_heatmaps.png")]
        paths[0].write_text(self.summary() + "\n")
        keys = ["configuration", *self.groups, "canonized", "image", *self.columns]
        rows = [",".join(keys)]
        for r in self.records:
            config = self.configurations[r["explainer"]]
            rows.append(",".join(str(v) for v in (r["explainer"], *config.values(), r["canonized"], r["image"],
                                                  *(r.get(c, "") for c in self.columns))))
        paths[1].write_text("\n".join(rows) + "\n")
        paths[2].write_text(json.dumps({"meta": self.meta, "groups": self.groups,
                                        "configurations": self.configurations,
                                        "means": self.means().tolist(), "combined": self.combined().tolist(),
                                        "records": self.records}, default=float))
        plot_marginals(self, paths[3])
        plot_extremes(self, paths[4])
        return paths


def _label(config: Mapping[str, float]) -> str:
    return ", ".join(f"{g}={v:g}" for g, v in config.items())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_marginals(result: SearchResult, path: Path) -> None:
    """Per metric, the mean score against each group's value, averaged over the other groups'
    values; one colour per group, canonized solid, not canonized dashed (the paper's figure)."""
    plt = _pyplot()
    means = result.means()
    shown = [k for k in range(len(result.columns)) if not np.isnan(means[:, :, k]).all()]
    cols = 4
    fig, axes = plt.subplots(-(-len(shown) // cols), cols, figsize=(3.2 * cols, 2.6 * -(-len(shown) // cols)),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, k in zip(axes.flat, shown):
        for g, group in enumerate(result.groups):
            values = sorted({c[group] for c in result.configurations})
            for canonized in (False, True):
                curve = [np.nanmean([means[i, int(canonized), k] for i, c in enumerate(result.configurations)
                                     if c[group] == v]) for v in values]
                ax.plot(range(len(values)), curve, "-" if canonized else "--", marker="o", ms=3,
                        color=colours[g % len(colours)], label=group if canonized else None)
            ax.set_xticks(range(len(values)), [f"{v:g}" for v in values])
        column = COLUMNS[result.columns[k]]
        ax.set_title(f"{column.arrow} {column.name}", fontsize=9)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, title="solid: canonized\ndashed: not", title_fontsize=7)
    fig.supxlabel("value of the group's parameter (others averaged)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_extremes(result: SearchResult, path: Path, image: int = 0) -> None:
    """Heatmaps of one image under the best and the worst configuration per metric, not canonized and canonized."""
    plt = _pyplot()
    shown = [c for c in result.columns if not np.isnan(result.means()[:, :, result._column(c)]).all()]
    fig, axes = plt.subplots(len(shown), 4, figsize=(7, 1.9 * len(shown)), squeeze=False)
    for row, metric in zip(axes, shown):
        for ax, (canonized, worst) in zip(row, itertools.product((False, True), (False, True))):
            config, score = result.best(metric, canonized, worst)
            heat = result.explanations[result.configurations.index(config), canonized][image, 0]
            scale = np.abs(heat).max() or 1.0
            ax.imshow(heat, cmap="bwr", vmin=-scale, vmax=scale)
            ax.set_title(f"{'worst' if worst else 'best'}, {'canon.' if canonized else 'not canon.'}: {score:.2f}\n"
                         f"{_label(config)}", fontsize=5)
            ax.axis("off")
        row[0].text(-0.1, 0.5, COLUMNS[metric].name, transform=row[0].transAxes, rotation=90, va="center",
                    ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def search(model: nn.Module | dict[bool, nn.Module], data: Data | tuple, groups: str | Mapping[str, Sequence[str]]
           = "auto", grid: Sequence[float] | Mapping[str, Sequence[float]] = DEFAULT_GAMMAS, *,
           rules: Mapping[str, str] | None = None, preset: str | Preset = "fast", pooling: str = "sum",
           init: str = "onehot", columns: Sequence[str] = TABLE_COLUMNS, seed: int = 0, batch_size: int = 16,
           progress: bool = True, explain: Callable[..., np.ndarray] = explain_fn) -> SearchResult:
    """Score every configuration of the grid (one value per group), canonized and not.

    ``grid`` gives the values for every group, or per group; ``rules`` maps a group to
    ``"epsilon"`` to search LRP-epsilon there instead of LRP-gamma (``PAPER_GAMMAS`` is the
    paper's gamma grid: 7 values per group, 2401 configurations for four groups).
    """
    data = as_data(data)
    models = model if isinstance(model, dict) else prepare(model, (data.x[:2], *(e[:2] for e in data.extra)))
    group_maps = [layer_groups(m, groups) for m in models.values()]
    names = tuple(group_maps[0])
    if any(tuple(g) != names or any(len(g[n]) != len(group_maps[0][n]) for n in names) for g in group_maps):
        raise ValueError("the canonized and the structural model split into different groups")
    values = {g: tuple(grid[g] if isinstance(grid, Mapping) else grid) for g in names}
    configurations = [dict(zip(names, combo)) for combo in itertools.product(*values.values())]
    explainers = {i: partial(explain, composite=group_composite(configuration_rules(group_maps, c, rules or {})),
                             pooling=pooling, init=init)
                  for i, c in enumerate(configurations)}
    records, _, maps = score_all(models, data, explainers, preset=preset, columns=columns, seed=seed,
                                 batch_size=batch_size, progress=progress, desc="search")
    meta = {"preset": preset if isinstance(preset, str) else repr(preset), "images": len(data), "grid": values,
            "rules": dict(rules or {}), "modules_per_group": {g: len(m) for g, m in group_maps[-1].items()}}
    return SearchResult(names, configurations, records, maps, tuple(columns), meta)


def main(argv: Sequence[str] | None = None) -> int:
    """``fxcanon search``: the gamma grid per layer group on a small trained model."""
    parser = argparse.ArgumentParser(prog="fxcanon search", description="LRP-gamma per layer group, canonized and not.")
    common_arguments(parser)
    parser.add_argument("--gamma", type=float, action="append",
                        help=f"repeat for the grid (default: {', '.join(map(str, DEFAULT_GAMMAS))}; "
                             f"the paper: {', '.join(map(str, PAPER_GAMMAS))})")
    parser.add_argument("--preset", choices=["paper", "fast"], default="fast")
    parser.set_defaults(images=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, data, _ = load_task(args.model, args.data, args.images, seed=args.seed, cache=args.cache,
                               weights=args.weights)
    pooling = args.pooling or ("pos_sq_sum" if args.model == "rn" else "sum")
    result = search(model, data, grid=tuple(args.gamma or DEFAULT_GAMMAS), preset=args.preset, pooling=pooling,
                    seed=args.seed)
    result.meta.update(model=args.model)
    print(result.summary())
    for path in result.save(args.out, f"{args.model}_"):
        print(path, file=sys.stderr)
    return 0
