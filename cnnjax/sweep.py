"""The runs under a directory (a sweep, an outputs directory or one run) and their grouping.

A run is a directory holding `summary.json`, `config.yaml` or `.hydra/overrides.yaml` (a
multirun job that crashed before writing its summary: status "failed"). The overrides that
differ between runs are what a sweep varied; runs that differ only in `trainer.seed` form a
group, with the mean and sample standard deviation of their test accuracy.
"""

import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from cnnjax import rundir
from cnnjax.errors import CnnjaxError, RunDirError

SEED_KEY = "trainer.seed"
RUN_MARKERS = (rundir.SUMMARY, rundir.CONFIG, ".hydra/overrides.yaml")
NO_SUMMARY = "no summary.json: the job stopped before writing it"
NO_END = "no final summary: still running, or killed (SIGKILL, out of memory)"
OPTUNA_RESULTS = "optimization_results.yaml"  # an Optuna sweep's directory has it
HYDRA_MODEL = ("hydra", "runtime", "choices", "model")  # in .hydra/hydra.yaml
RESULTS = (  # summary.json's fields, taken as they are
    "test_accuracy", "test_loss", "best_test_accuracy", "params", "macs", "train_wall_s",
    "steps", "epochs",
)  # fmt: skip


class NoRuns(CnnjaxError):
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


def read_curve(run_dir: Path) -> tuple[tuple[float, float], ...]:
    """(epoch, accuracy) of the test lines of a run's metrics."""
    rows = rundir.read_metrics(run_dir)
    return tuple(
        (float(r["epoch"]), float(r["accuracy"])) for r in rows if r.get("split") == "test"
    )


def load_run(path: Path, root: Path) -> Run:
    """What the files of run directory `path` say (a missing summary: status "failed")."""
    hydra, problems = path / ".hydra", []
    try:
        config = rundir.read_config(path)
    except RunDirError as e:
        config, problems = None, [str(e)]
    config = OmegaConf.to_container(config) if config else read_yaml(hydra / "config.yaml")
    try:
        summary = rundir.read_summary(path)
        error = None if summary is not None else NO_SUMMARY
    except ValueError as e:
        summary, error = None, f"summary.json cannot be read: {e}"
    summary = summary or {}
    error = "; ".join(filter(None, [error, *problems])) or None
    overrides = summary.get("overrides")  # the run's own (.hydra/ holds the last attempt's)
    if overrides is None:
        overrides = read_yaml(hydra / "overrides.yaml") or []
    status = summary.get("status", "failed")
    rf = summary.get("receptive_field")
    return Run(
        run=path.relative_to(root).as_posix() if path != root else ".",
        status=status,
        model=summary.get("model") or dig(read_yaml(hydra / "hydra.yaml"), *HYDRA_MODEL),
        seed=dig(config, "trainer", "seed"),
        **{k: summary.get(k) for k in RESULTS},
        receptive_field="x".join(map(str, rf)) if rf else None,
        overrides=parse_overrides(overrides),
        error=summary.get("error", NO_END if status == "running" else error),
        curve=read_curve(path),
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
