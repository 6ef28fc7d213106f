"""`bench.mode=time_to_accuracy` (`[bench.target=0.91]`, for instance with
`'bench.train_overrides=["trainer.epochs=2"]'`): wall seconds to a test accuracy with the
training recipe of conf/train.yaml (its defaults, then `bench.train_overrides`, which win).
cnnjax: `python -m cnnjax.train trainer.target_accuracy=...` in a subprocess, timed from its
start to its exit (interpreter start-up and imports included; `cnnjax_run_s` is the run's own
in-process figure, `cnnjax_compile_s` its first step's). PyTorch (`reference`): the same recipe
with the twin, in process, from data loading on; options it cannot reproduce are refused before
either side trains. `ratio` is torch_seconds over cnnjax_seconds: above 1, cnnjax is faster; it
is null (with a `note`) when a side used up its steps below the target. Uses the persistent
compilation cache `bench.compilation_cache_dir` (null: off).
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

from cnnjax import recipe, rundir, runtime, validation
from cnnjax.errors import ConfigError


def measure(cfg: DictConfig, model_name: str | None = None) -> dict:
    """Wall seconds of both sides to `bench.target` with the training recipe (whose model the
    cnnjax run names; `model_name`, bench's own model, plays no part)."""
    b = cfg.bench
    cache = runtime.use_compilation_cache(b.compilation_cache_dir)  # the reference's init, too
    overrides = [
        f"trainer.target_accuracy={b.target}",
        "trainer.progress=false",
        "trainer.compilation_cache_dir=" + (f"'{cache}'" if cache else "null"),
        *b.train_overrides,
    ]
    train_cfg = runtime.compose("train", overrides)
    validation.check(train_cfg)
    target = train_cfg.trainer.target_accuracy
    if target is None:
        raise ConfigError("bench.mode=time_to_accuracy needs a target: set bench.target")
    if b.reference == "torch":
        from cnnjax.bench import reference

        reference.check(train_cfg)  # refuse before anything trains
    recipe.load_dataset(train_cfg.dataset)  # prepared and in the page cache before either side
    run, summary = _train_cnnjax(overrides)
    result = {
        "mode": "time_to_accuracy",
        "target": target,
        "model": summary["model"],
        "dataset": train_cfg.dataset.name,
        **runtime.platform(),
        **run,
    }
    if b.reference == "torch":
        result |= reference.train_to_target(train_cfg, target)
        missed = [s for s in ("cnnjax", "torch") if not result[f"{s}_reached_target"]]
        result["ratio"] = (
            None if missed else round(result["torch_seconds"] / result["cnnjax_seconds"], 3)
        )
        if missed:
            result["note"] = (
                f"{' and '.join(missed)} did not reach {target} within the recipe's steps: "
                "no time to accuracy to compare"
            )
    return result


def _train_cnnjax(overrides: list[str]) -> tuple[dict, dict]:
    """`python -m cnnjax.train` with `overrides` in a temporary run directory: its wall seconds
    from start to exit and what its summary says, and the summary."""
    with tempfile.TemporaryDirectory(prefix="cnnjax-bench-") as run_dir:
        args = [sys.executable, "-m", "cnnjax.train", *overrides, f"hydra.run.dir={run_dir}"]
        start = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        summary = rundir.read_summary(Path(run_dir)) or {}
    if proc.returncode != 0 or summary.get("status") != "completed":
        raise RuntimeError(
            f"the cnnjax run ({' '.join(args[1:])}) ended with status {summary.get('status')} "
            f"and exit code {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return {
        "cnnjax_seconds": round(seconds, 2),
        "cnnjax_accuracy": summary["test_accuracy"],
        "cnnjax_epochs": summary["epochs"],
        "cnnjax_steps": summary["steps"],
        "cnnjax_reached_target": summary["reached_target"],
        "cnnjax_compile_s": summary["compile_s"],
        "cnnjax_run_s": summary["total_wall_s"],
    }, summary
