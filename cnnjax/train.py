"""`python -m cnnjax.train [overrides]`: config -> recipe -> compiled steps -> loop -> run dir.

The run directory (Hydra's) gets `config.yaml` (resolved), `metrics.jsonl` (one JSON object per
fetch: train lines every `trainer.log_every` steps, test lines after evaluations), TensorBoard
events, `checkpoints/` (orbax: every `trainer.checkpoint_every` steps, every epoch end and the
last step) and `summary.json`, whose `status` is "completed", "interrupted" (SIGTERM/Ctrl-C,
after a checkpoint), "diverged" or "failed". Running the same command in the same directory
resumes from the latest checkpoint and ends exactly as an uninterrupted run would.

With `trainer.target_accuracy`, the run ends (completed) after the first test evaluation that
reaches it; the summary says when (`reached_target`, `target_step`, `target_epoch`,
`target_train_wall_s`). Compilations are kept in JAX's persistent cache,
`trainer.compilation_cache_dir` (null: off), so that later runs load them instead of compiling.

The steps run data parallel over every device of every process (`cnnjax.parallel`, config
`distributed`); only process 0 writes the run directory.
"""

import contextlib
import logging
import math
import time
from pathlib import Path

import hydra
import jax
import tensorflow_datasets as tfds
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnjax import checkpoint, loop, onednn, parallel, recipe, rundir, runtime, validation
from cnnjax.errors import CnnjaxError, reported
from cnnjax.runtime import CONF_DIR

log = logging.getLogger("cnnjax.train")


def run(
    cfg: DictConfig, run_dir: Path, model_name: str, job_num: int = 0, overrides: list[str] = ()
) -> dict:
    """Train and evaluate as `cfg` says, writing into `run_dir`; returns the summary.
    `model_name` is the model's config name, `job_num` the job's number in a sweep, `overrides`
    the command line's (recorded in the summary). An attempt refused before it trains (bad
    settings, another process or another run in the directory, data that does not fit) raises
    a CnnjaxError and leaves what the directory held as it was."""
    validation.check(cfg)
    start = time.perf_counter()
    cache_dir = runtime.use_compilation_cache(cfg.trainer.compilation_cache_dir)
    d = cfg.distributed
    runtime.join_processes(
        d.initialize, d.coordinator_address, d.num_processes, d.process_id, d.cpu_collectives,
        d.initialization_timeout_s,
    )  # fmt: skip
    run_dir = Path(parallel.agree(str(run_dir.absolute())))  # process 0's directory for all
    primary = jax.process_index() == 0  # only process 0 writes files and logs progress
    if not primary:
        logging.getLogger("cnnjax").setLevel(logging.WARNING)
    summary = {
        "status": "running",
        "model": model_name,
        "dataset": cfg.dataset.name,
        "run_dir": str(run_dir),
        **runtime.platform(),
        "processes": jax.process_count(),
        "compilation_cache_dir": cache_dir,
        "overrides": list(overrides),
    }
    with rundir.Lock(run_dir) if primary else contextlib.nullcontext():
        fresh = not rundir.holds_run(run_dir)  # nothing of an earlier attempt to keep
        writer = rundir.RunWriter(run_dir, primary)
        try:
            with loop.StopSignals() as stop:
                summary |= train_and_evaluate(cfg, writer, stop, job_num, summary)
            summary["status"] = "completed"
        except loop.Interrupted as e:
            summary |= {"status": "interrupted", "error": str(e)}
            log.warning("%s; run the same command again to resume", e)
        except BaseException as e:
            failed = "diverged" if isinstance(e, loop.Diverged) else "failed"
            summary |= {"status": failed, "error": f"{type(e).__name__}: {e}"}
            raise
        finally:
            summary["total_wall_s"] = round(time.perf_counter() - start, 2)
            if fresh and not writer.begun:  # a first attempt that never trained: its record
                writer.config(cfg)
            if fresh or writer.begun:  # a refused attempt leaves an earlier run as it was
                writer.summary(**summary)
            writer.close()
    if summary["status"] == "completed":
        log_result(summary, cfg.trainer.target_accuracy)
        if cfg.trainer.visualize and primary:
            from cnnjax.plots import run_pictures  # matplotlib: only when pictures are asked for

            settings = runtime.compose("visualize")  # `python -m cnnjax.visualize`'s defaults
            settings.run_dir = str(run_dir)
            log.info("\n".join(run_pictures.draw(**settings).lines))
    return summary


def train_and_evaluate(
    cfg: DictConfig, writer: rundir.RunWriter, stop: loop.StopSignals, job_num: int, header: dict
) -> dict:
    """Set up from `cfg`, resume from the run directory's checkpoints when they are this run's,
    and once every check has passed start the run (`writer.begin`, with `header` as its first
    summary) and loop; returns the summary fields it measured."""
    t = cfg.trainer
    if not t.progress:
        tfds.disable_progress_bar()
    lay = parallel.layout(cfg.distributed.devices, job_num)
    parallel.check_batch_size(t.batch_size, lay, "trainer.batch_size")
    parallel.check_batch_size(t.eval_batch_size, lay, "trainer.eval_batch_size")
    # oneDNN's custom calls run on one device only
    conv_backend = onednn.resolve(t.conv_backend, lay.device_count)
    r = recipe.prepare(cfg, conv_backend)
    log.info("input adaptation for %s: %s", type(r.model).__name__, r.adaptation)
    if cfg.dataset.mean is None or cfg.dataset.std is None:
        log.info("normalisation from the training images: mean %s, std %s",
                 r.normalisation["mean"], r.normalisation["std"])  # fmt: skip
    for warning in r.table.warnings:
        log.warning(warning)
    steps = loop.Steps(
        train=jax.jit(
            r.train_step,
            in_shardings=(lay.replicated, lay.batch, lay.replicated),
            out_shardings=lay.replicated,
            donate_argnums=0,
        ),
        eval=jax.jit(
            r.eval_step, in_shardings=(lay.replicated, lay.batch), out_shardings=lay.replicated
        ),
    )
    checkpoints = checkpoint.Checkpoints(
        writer.run_dir / "checkpoints", t.keep_checkpoints, run=r.definition
    )
    try:
        state, rng = parallel.replicate((r.state, r.rng), lay)
        recorded = previous_run(writer.run_dir)
        start = loop.resume(checkpoints, state, rng, r.settings, t.resume, recorded)
        writer.begin(cfg, header | {"run": r.definition}, step=int(start.state.step))
        final, totals = r.table.rows[-1], r.table.totals
        log.info(
            "%s: %s params, %.1f M MACs per image, final receptive field %s; %d train / %d test "
            "examples; %d steps (%d per epoch, batch %d over %d device(s) of %d process(es))",
            type(r.model).__name__, f"{totals.trainable_params:,}", totals.macs / 1e6,
            "x".join(map(str, final.rf)) if final.rf else "unknown", len(r.train_split.labels_N),
            len(r.test_split.labels_N), r.settings.total_steps, r.settings.steps_per_epoch,
            t.batch_size, lay.device_count, lay.process_count,
        )  # fmt: skip
        log.info("convolutions: %s (trainer.conv_backend=%s)", conv_backend, t.conv_backend)
        splits = (r.train_split, r.test_split)
        results = loop.Loop(r.settings, steps, splits, lay, writer, checkpoints, stop, start).run()
    finally:
        checkpoints.close()
    return {
        "run": r.definition,
        "conv_backend": conv_backend,
        "params": totals.trainable_params,
        "macs": totals.macs,
        "receptive_field": list(final.rf) if final.rf else None,  # None: unknown
        "input_adaptation": r.adaptation,
        "normalisation": r.normalisation,
        "class_names": r.class_names,
        **results,
    }


def previous_run(run_dir: Path) -> dict | None:
    """The definition of the run an earlier attempt recorded in the directory's summary (None:
    none recorded, or no readable summary)."""
    try:
        return (rundir.read_summary(run_dir) or {}).get("run")
    except ValueError:
        return None


def log_result(summary: dict, target_accuracy: float | None) -> None:
    """The final lines of a completed run."""
    log.info(
        "test accuracy %.4f (loss %.4f) after %d steps, %.1f epochs, %.1f s; run dir %s",
        summary["test_accuracy"], summary["test_loss"], summary["steps"], summary["epochs"],
        summary["total_wall_s"], summary["run_dir"],
    )  # fmt: skip
    if summary.get("reached_target"):
        log.info(
            "reached the target accuracy %s at step %d (epoch %s), %.1f s into training",
            target_accuracy, summary["target_step"], summary["target_epoch"],
            summary["target_train_wall_s"],
        )  # fmt: skip


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    """Entry point; returns the test accuracy (the objective of sweeps). An error the user can
    fix ends the command with its message and status 2. In a sweep, a job that fails or
    diverges returns NaN (its summary.json says why) and the sweep goes on."""
    hydra_cfg = HydraConfig.get()
    model_name, job_num = hydra_cfg.runtime.choices["model"], hydra_cfg.job.get("num") or 0
    output_dir, overrides = Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task)
    attempt = lambda: run(cfg, output_dir, model_name, job_num, overrides)  # noqa: E731
    if hydra_cfg.mode != RunMode.MULTIRUN:
        with reported():
            return attempt().get("test_accuracy", math.nan)
    try:
        return attempt().get("test_accuracy", math.nan)
    except CnnjaxError as e:
        log.error("job %s failed; the sweep goes on. %s", job_num, e)
    except Exception:
        log.exception("job %s failed; the sweep goes on", job_num)
    return math.nan


if __name__ == "__main__":
    main()
