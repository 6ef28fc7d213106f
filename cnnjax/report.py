"""`python -m cnnjax.report <dir> [--out DIR]`: tables and plots of the runs under a directory.

The runs and their groups are `cnnjax.sweep`'s: the overrides that differ between runs become
columns, and runs that differ only in `trainer.seed` are pooled (mean and sample standard
deviation of their test accuracy). Writes `report.csv` (one row per
run), `report.md` (the groups, best first, and every run that did not complete, with its error)
and PNG plots (matplotlib, Agg) into `--out` (default: <dir>); for an Optuna search (the
directory has `optimization_results.yaml`) also `trials.png`: the trials in order, best so far.
"""

import argparse
import csv
import math
from collections.abc import Callable
from pathlib import Path

from cnnjax.errors import reported
from cnnjax.plots import sweep_plots
from cnnjax.sweep import (
    OPTUNA_RESULTS,
    RESULTS,
    RUN_MARKERS,
    SEED_KEY,
    Group,
    NoRuns,
    Run,
    group_runs,
    load_runs,
    numeric_keys,
    varying_keys,
)

CSV_FIELDS = ("run", "status", "model", "seed", *RESULTS, "receptive_field")


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
    for name, draw, why in sweep_plots.plot_jobs(groups, numeric_keys(runs, keys), runs, search):
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
    with reported():
        if not args.dir.is_dir():
            problem = "is not a directory" if args.dir.exists() else "does not exist"
            raise NoRuns(f"{args.dir} {problem}: pass a multirun, outputs or run directory")
        lines = write_report(args.dir, args.out or args.dir)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
