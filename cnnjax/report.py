"""`python -m cnnjax.report <dir> [--out DIR]`: tables and plots of the runs under a directory.

A run is a directory holding `summary.json`, `config.yaml` or `.hydra/overrides.yaml` (a
multirun job that crashed before writing its summary: status "failed"). The overrides that
differ between runs become columns; runs that differ only in `trainer.seed` form a group, with
the mean and sample standard deviation of their test accuracy. Writes `report.csv` (one row per
run), `report.md` (the groups, best first, and every run that did not complete, with its error)
and PNG plots (matplotlib, Agg) into `--out` (default: <dir>); for an Optuna search (the
directory has `optimization_results.yaml`) also `trials.png`: the trials in order, best so far.
"""

import argparse
import csv
import itertools
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SEED_KEY = "trainer.seed"
RUN_MARKERS = ("summary.json", "config.yaml", ".hydra/overrides.yaml")
NO_SUMMARY = "no summary.json: the job stopped before writing it"
NO_END = "no final summary: still running, or killed (SIGKILL, out of memory)"
FIGSIZE = (6.4, 4.8)  # inches; PNGs are FIGSIZE x DPI pixels (640x480)
DPI = 100
OPTUNA_RESULTS = "optimization_results.yaml"  # an Optuna sweep's directory has it: trials.png
HYDRA_MODEL = ("hydra", "runtime", "choices", "model")  # in .hydra/hydra.yaml
RESULTS = (  # summary.json's fields, taken as they are
    "test_accuracy", "test_loss", "best_test_accuracy", "params", "macs", "train_wall_s",
    "steps", "epochs",
)  # fmt: skip
CSV_FIELDS = ("run", "status", "model", "seed", *RESULTS, "receptive_field")


class NoRuns(Exception):
    """The directory holds no run."""


@dataclass(frozen=True)
class Run:
    """One run directory: its overrides, status and results (None where it has none)."""

    run: str  # its path relative to the reported directory
    status: str
    model: str | None = None
    seed: int | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    best_test_accuracy: float | None = None
    params: int | None = None
    macs: int | None = None
    receptive_field: str | None = None  # final layer's, "HxW"
    train_wall_s: float | None = None
    steps: int | None = None
    epochs: float | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    curve: tuple[tuple[float, float], ...] = ()  # (epoch, test accuracy)

    @property
    def completed(self) -> bool:
        return self.status == "completed" and self.test_accuracy is not None


@dataclass(frozen=True)
class Group:
    """Runs with the same varying overrides, seeds aside."""

    values: dict[str, str]
    runs: tuple[Run, ...]

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.completed]

    @property
    def n(self) -> int:
        return len(self.completed)

    @property
    def not_completed(self) -> int:
        return len(self.runs) - self.n

    @property
    def mean(self) -> float:
        return statistics.mean(r.test_accuracy for r in self.completed) if self.n else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); NaN below two runs."""
        return statistics.stdev(r.test_accuracy for r in self.completed) if self.n > 1 else math.nan

    @property
    def train_wall_s(self) -> float:
        walls = [r.train_wall_s for r in self.completed if r.train_wall_s is not None]
        return statistics.mean(walls) if walls else math.nan

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "all runs"

    def first(self, name: str):
        """The first completed run's `name` (params, MACs, … are equal within a group)."""
        values = (getattr(r, name) for r in self.completed)
        return next((v for v in values if v is not None), None)

    def curve(self) -> list[tuple[float, float]]:
        """Test accuracy against epoch, the mean over the completed runs."""
        by_epoch: dict[float, list[float]] = {}
        for run in self.completed:
            for epoch, accuracy in run.curve:
                by_epoch.setdefault(epoch, []).append(accuracy)
        return [(e, statistics.mean(a)) for e, a in sorted(by_epoch.items())]


def natural_key(path: Path) -> list:
    """Sort key in which job 10 comes after job 9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_runs(root: Path) -> list[Path]:
    """The run directories under `root` (itself included), in natural order."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        path = Path(dirpath)
        if path.name != ".hydra" and any((path / m).is_file() for m in RUN_MARKERS):
            found.append(path)
            dirnames.clear()  # a run's subdirectories (.hydra, checkpoints) hold no runs
    return sorted(found, key=natural_key)


def read_yaml(path: Path):
    """The YAML document at `path`, or None when there is no such file."""
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def dig(tree, *keys):
    """tree[k1][k2]…, or None where a level is missing."""
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Hydra's override strings (`key=value`, `+key=value`, `~key`) as {key: value}."""
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = "(deleted)" if key.startswith("~") else value
    return out


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl (none when it is missing); a torn last line is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_curve(path: Path) -> tuple[tuple[float, float], ...]:
    """(epoch, accuracy) of the test lines of a metrics.jsonl."""
    rows = read_metrics(path)
    return tuple(
        (float(r["epoch"]), float(r["accuracy"])) for r in rows if r.get("split") == "test"
    )


def load_run(path: Path, root: Path) -> Run:
    """What the files of run directory `path` say (a missing summary: status "failed")."""
    hydra = path / ".hydra"
    config = read_yaml(path / "config.yaml") or read_yaml(hydra / "config.yaml")
    summary, error = {}, NO_SUMMARY
    if (path / "summary.json").is_file():
        try:
            summary, error = json.loads((path / "summary.json").read_text()), None
        except json.JSONDecodeError as e:
            error = f"summary.json cannot be read: {e}"
    status = summary.get("status", "failed")
    rf = summary.get("receptive_field")
    return Run(
        run=path.relative_to(root).as_posix() if path != root else ".",
        status=status,
        model=summary.get("model") or dig(read_yaml(hydra / "hydra.yaml"), *HYDRA_MODEL),
        seed=dig(config, "trainer", "seed"),
        **{k: summary.get(k) for k in RESULTS},
        receptive_field="x".join(map(str, rf)) if rf else None,
        overrides=parse_overrides(read_yaml(hydra / "overrides.yaml") or []),
        error=summary.get("error", NO_END if status == "running" else error),
        curve=read_curve(path / "metrics.jsonl"),
    )


def load_runs(root: Path) -> list[Run]:
    return [load_run(path, root) for path in find_runs(root)]


def varying_keys(runs: list[Run]) -> list[str]:
    """The override keys whose values differ between runs (a missing key counts as a value)."""
    keys = dict.fromkeys(k for r in runs for k in r.overrides)
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def group_runs(runs: list[Run], keys: list[str]) -> list[Group]:
    """Runs grouped by the values of `keys`, best mean test accuracy first (empty groups last)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.overrides.get(k, "") for k in keys), []).append(run)
    out = [Group(dict(zip(keys, values, strict=True)), tuple(g)) for values, g in groups.items()]
    return sorted(out, key=lambda g: (math.isnan(g.mean), 0 if math.isnan(g.mean) else -g.mean))


def as_float(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def numeric_keys(runs: list[Run], keys: list[str]) -> list[str]:
    """Those of `keys` whose every value is a number."""
    values = {k: [r.overrides[k] for r in runs if k in r.overrides] for k in keys}
    return [k for k in keys if values[k] and all(as_float(v) is not None for v in values[k])]


def fmt(value, spec: str = "") -> str:
    """A table cell: empty for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def accuracy_cell(group: Group) -> str:
    """'mean ± std', the mean alone for one run, empty for none."""
    if not group.n:
        return ""
    return f"{group.mean:.4f}" + (f" ± {group.std:.4f}" if group.n > 1 else "")


GROUP_COLUMNS: tuple[tuple[str, Callable[[Group], object]], ...] = (
    ("model", lambda g: fmt(g.first("model"))),
    ("n", lambda g: g.n),
    ("seeds", lambda g: ", ".join(fmt(r.seed) for r in g.completed)),
    ("test accuracy (mean ± std)", accuracy_cell),
    ("train s (mean)", lambda g: fmt(g.train_wall_s, ".1f")),
    ("params", lambda g: fmt(g.first("params"), ",")),
    ("MACs", lambda g: fmt(g.first("macs"), ",")),
    ("receptive field", lambda g: fmt(g.first("receptive_field"))),
    ("not completed", lambda g: g.not_completed),
)


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; pipes in cells are escaped, line breaks flattened."""

    def line(cells: list) -> str:
        text = (str(c).replace("|", "\\|").replace("\n", " ") for c in cells)
        return "| " + " | ".join(text) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def markdown(root: Path, runs: list[Run], groups: list[Group], keys: list[str]) -> str:
    """report.md: the groups, best first, and the runs that did not complete, with their errors."""
    columns = [(h, cell) for h, cell in GROUP_COLUMNS if h not in keys]  # model may be a key
    groups_table = md_table(
        [*keys, *(h for h, _ in columns)],
        [[*g.values.values(), *(cell(g) for _, cell in columns)] for g in groups],
    )
    failed = [r for r in runs if not r.completed]
    swept = [k for k in keys if k != "model"]  # a swept model is the model column
    failed_table = md_table(
        ["run", "status", "model", *swept, "seed", "error"],
        [
            [r.run, r.status, fmt(r.model), *(r.overrides.get(k, "") for k in swept), fmt(r.seed),
             fmt(r.error)]
            for r in failed
        ],
    )  # fmt: skip
    by = f"grouped by {', '.join(keys)}" if keys else "one group"
    sections = [
        f"# Runs under {root}",
        f"{len(runs)} runs, {len(runs) - len(failed)} completed; {by}, seeds pooled.",
        "## Groups, by mean test accuracy",
        groups_table,
        "## Runs that did not complete",
        failed_table if failed else "None: every run completed.",
    ]
    return "\n\n".join(sections) + "\n"


def write_csv(path: Path, runs: list[Run], keys: list[str]) -> None:
    """report.csv: one row per run, every field, the varying overrides as columns."""
    columns = [k for k in keys if k not in CSV_FIELDS]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_FIELDS, *columns, "overrides", "error"])
        for r in runs:
            writer.writerow(
                [fmt(getattr(r, name)) for name in CSV_FIELDS]
                + [r.overrides.get(k, "") for k in columns]
                + [" ".join(f"{k}={v}" for k, v in r.overrides.items()), fmt(r.error)]
            )


@contextmanager
def figure(path: Path, title: str, xlabel: str, logx: bool = False) -> Iterator:
    """Axes to draw on, saved to `path` (FIGSIZE x DPI pixels) with a legend on leaving."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
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


def write_report(root: Path, out: Path) -> list[str]:
    """Write report.csv, report.md and the plots of the runs under `root` into `out`; returns
    what was written and skipped, a line each. NoRuns when there are none."""
    runs = load_runs(root)
    if not runs:
        raise NoRuns(f"no runs under {root}: no directory there holds {' or '.join(RUN_MARKERS)}")
    keys = [k for k in varying_keys(runs) if k != SEED_KEY]
    groups = group_runs(runs, keys)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "report.csv", runs, keys)
    (out / "report.md").write_text(markdown(root, runs, groups, keys))
    lines = [
        f"{len(runs)} runs ({sum(r.completed for r in runs)} completed) in {len(groups)} groups",
        f"wrote {out / 'report.csv'}",
        f"wrote {out / 'report.md'}",
    ]
    search = (root / OPTUNA_RESULTS).is_file()
    for name, draw, why in plot_jobs(groups, numeric_keys(runs, keys), runs, search):
        lines.append(f"wrote {out / name}" if draw(out / name) else f"skipped {name}: {why}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """The CLI; exits with status 2 and a message when the directory is missing or empty."""
    parser = argparse.ArgumentParser(
        prog="python -m cnnjax.report",
        description="Tables (report.csv, report.md) and plots of the training runs under DIR.",
    )
    parser.add_argument("dir", type=Path, help="a multirun dir, an outputs dir or one run dir")
    parser.add_argument("--out", type=Path, help="where to write (default: DIR)")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        problem = "is not a directory" if args.dir.exists() else "does not exist"
        parser.error(f"{args.dir} {problem}")
    try:
        lines = write_report(args.dir, args.out or args.dir)
    except NoRuns as e:
        parser.error(str(e))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
