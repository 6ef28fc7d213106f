"""Plots of the runs of a sweep: test accuracy against parameters, MACs and each swept number,
learning curves, and the trials of a search; each `plot_*` returns False when it has nothing to
draw."""

import itertools
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from cnnjax.plots.figures import DPI, new_figure
from cnnjax.sweep import Group, Run, as_float


@contextmanager
def figure(path: Path, title: str, xlabel: str, logx: bool = False) -> Iterator:
    """Axes to draw on, saved to `path` (640x480 pixels) with a legend on leaving."""
    fig = new_figure()
    ax = fig.subplots()
    ax.set(title=title, xlabel=xlabel, ylabel="test accuracy")
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    yield ax
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=DPI)


def error_bars(ax, points: list[tuple[float, Group]], label: str | None, style: str) -> None:
    """Groups' mean test accuracy at x, their std as error bars (none below two runs)."""
    xs, groups = zip(*sorted(points, key=lambda p: p[0]), strict=True)
    yerr = [0.0 if math.isnan(g.std) else g.std for g in groups]
    ax.errorbar(xs, [g.mean for g in groups], yerr=yerr, fmt=style, capsize=3, label=label)


def plot_vs_size(groups: list[Group], name: str, xlabel: str, path: Path) -> bool:
    """Accuracy against the groups' `name` (params or macs), log x; False when none has it."""
    points = [(g.first(name), g) for g in groups if g.n and g.first(name)]
    if not points:
        return False
    with figure(path, f"test accuracy vs {xlabel}", xlabel, logx=True) as ax:
        for x, g in points:
            error_bars(ax, [(x, g)], g.label, "o")
    return True


def plot_curves(groups: list[Group], path: Path) -> bool:
    """Test accuracy against epoch, a line per group (mean over seeds); False when none has one."""
    curves = [(g, curve) for g in groups if (curve := g.curve())]
    if not curves:
        return False
    with figure(path, "learning curves (mean over seeds)", "epoch") as ax:
        for g, curve in curves:
            ax.plot(*zip(*curve, strict=True), marker="o", label=g.label)
    return True


def plot_vs_override(groups: list[Group], key: str, path: Path) -> bool:
    """Accuracy against the numeric override `key`, a line per value of the other overrides;
    log x when the values are positive and span a decade. False when no group has a result."""
    series: dict[str, list[tuple[float, Group]]] = {}
    for g in groups:
        if g.n and (x := as_float(g.values.get(key))) is not None:
            rest = ", ".join(f"{k}={v}" for k, v in g.values.items() if k != key)
            series.setdefault(rest, []).append((x, g))
    xs = [x for points in series.values() for x, _ in points]
    if not xs:
        return False
    logx = min(xs) > 0 and max(xs) / min(xs) >= 10
    with figure(path, f"test accuracy vs {key}", key, logx=logx) as ax:
        for rest, points in series.items():
            error_bars(ax, points, rest or None, "o-")
    return True


def plot_trials(runs: list[Run], path: Path) -> bool:
    """A search's trials in the order they ran: each one's test accuracy and the best so far.
    False when no trial completed."""
    points = [(i, r.test_accuracy) for i, r in enumerate(runs) if r.completed]
    if not points:
        return False
    best = list(itertools.accumulate((a for _, a in points), max))
    with figure(path, "search trials in the order they ran", "trial") as ax:
        ax.plot(*zip(*points, strict=True), "o", label="trial")
        ax.step([i for i, _ in points], best, where="post", label="best so far")
        failed = [i for i, r in enumerate(runs) if not r.completed]
        if failed:
            low = min(a for _, a in points)
            ax.plot(failed, [low] * len(failed), "x", color="red", label="failed or diverged")
    return True


def plot_jobs(
    groups: list[Group], keys: list[str], runs: list[Run], search: bool
) -> list[tuple[str, Callable, str]]:
    """(file name, draw(path) -> drawn, why it may be empty) for every plot; the trials plot
    when the runs are an Optuna search (`search`)."""
    trials = [("trials.png", partial(plot_trials, runs), "no trial completed")] if search else []
    return [
        *trials,
        ("accuracy_vs_params.png", partial(plot_vs_size, groups, "params", "parameters"),
         "no completed run has params"),
        ("accuracy_vs_macs.png", partial(plot_vs_size, groups, "macs", "MACs per image"),
         "no completed run has macs"),
        ("learning_curves.png", partial(plot_curves, groups),
         "no completed run has test lines in metrics.jsonl"),
        *((f"accuracy_vs_{re.sub(r'[^A-Za-z0-9]+', '_', k)}.png",
           partial(plot_vs_override, groups, k), f"no completed run has a numeric {k}")
          for k in keys),
    ]  # fmt: skip
