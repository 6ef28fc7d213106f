"""`python -m cnnjax.train [overrides]`: wire config -> model, data, optimizer; loop; write the run.

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

import functools
import itertools
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import hydra
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from flax import linen as nn
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from jax.experimental.compilation_cache import compilation_cache
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cnnjax import analysis, checkpoint, data, engine, onednn, parallel
from cnnjax.artifacts import RunWriter

log = logging.getLogger("cnnjax.train")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # every entry point's configs
COMPUTE_DTYPES = {"fp32": None, "bf16": jnp.bfloat16}  # trainer.precision; parameters stay fp32


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: a checkpoint was saved and the run stops cleanly."""


def use_compilation_cache(directory: str | None) -> str | None:
    """Point JAX's persistent compilation cache at `directory` (`~` expanded; None turns it off),
    caching every compilation however quick or small; returns the directory in use."""
    path = os.path.expanduser(directory) if directory else None
    if path != jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()  # the next compilation opens the new directory
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor
    return path


def platform() -> dict:
    """The JAX device and version, as summaries and benchmarks record them."""
    return {"device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__}


def load_dataset(cfg: DictConfig) -> tuple[data.Split, data.Split]:
    """The train and test splits named by the dataset config."""
    ds = cfg.dataset
    source_dir = os.path.expanduser(ds.source_dir) if ds.source_dir else None
    kw = dict(
        data_dir=ds.data_dir,
        source_dir=source_dir,
        image_size=ds.image_size,
        num_classes=ds.num_classes,
        apt_package=ds.apt_package,
    )
    return data.load_split(ds.name, ds.train_split, **kw), data.load_split(
        ds.name, ds.test_split, **kw
    )


class StopSignals:
    """SIGTERM and Ctrl-C set `signal` for the loop to checkpoint and stop at the next step; a
    second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def evaluate(
    eval_fn, state: engine.TrainState, split: data.Split, batch_size: int, lay: parallel.Layout
) -> dict:
    """Mean loss and accuracy over the whole split; each process feeds its rows of every batch."""
    rows, limit = parallel.process_rows(lay, batch_size), parallel.in_flight_limit(lay)
    sums = []
    for i, batch in enumerate(data.eval_batches(split, batch_size), 1):
        mine = {k: v[rows] for k, v in batch.items()}
        sums.append(eval_fn(state, parallel.shard_batch(lay, mine, batch_size)))
        if limit and i % limit == 0:
            jax.block_until_ready(sums[-1])
    totals = {k: float(np.sum([s[k] for s in jax.device_get(sums)])) for k in sums[0]}
    return {
        "loss": totals["loss_sum"] / totals["count"],
        "accuracy": totals["correct"] / totals["count"],
    }


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train and evaluate as `cfg` says, writing into `run_dir`; returns the summary."""
    start = time.perf_counter()
    cache_dir = use_compilation_cache(cfg.trainer.compilation_cache_dir)
    d = cfg.distributed
    parallel.initialize(
        d.initialize, d.coordinator_address, d.num_processes, d.process_id, d.cpu_collectives,
        d.initialization_timeout_s,
    )  # fmt: skip
    run_dir = Path(parallel.agree(str(run_dir.absolute())))  # process 0's directory for all
    primary = jax.process_index() == 0  # only process 0 writes files and logs progress
    if not primary:
        logging.getLogger("cnnjax").setLevel(logging.WARNING)
    run_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    writer = RunWriter(run_dir, primary)
    summary = {
        "status": "running",
        "model": HydraConfig.get().runtime.choices["model"],
        "dataset": cfg.dataset.name,
        "run_dir": str(run_dir),
        **platform(),
        "processes": jax.process_count(),
        "compilation_cache_dir": cache_dir,
    }
    writer.summary(**summary)
    try:
        with StopSignals() as stop:
            summary |= train_and_evaluate(cfg, writer, stop)
        summary["status"] = "completed"
    except Interrupted as e:
        summary |= {"status": "interrupted", "error": str(e)}
        log.warning("%s; run the same command again to resume", e)
    except Diverged as e:
        summary |= {"status": "diverged", "error": str(e)}
        log.error(str(e))
        raise
    except BaseException as e:
        summary |= {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        raise
    finally:
        summary["total_wall_s"] = round(time.perf_counter() - start, 2)
        writer.summary(**summary)
        writer.close()
    if summary["status"] == "completed":
        log.info(
            "test accuracy %.4f (loss %.4f) after %d steps, %.1f epochs, %.1f s; run dir %s",
            summary["test_accuracy"],
            summary["test_loss"],
            summary["steps"],
            summary["epochs"],
            summary["total_wall_s"],
            run_dir,
        )
        if cfg.trainer.visualize and primary:
            draw_pictures(run_dir)
        if summary.get("reached_target"):
            log.info(
                "reached the target accuracy %s at step %d (epoch %s), %.1f s into training",
                cfg.trainer.target_accuracy,
                summary["target_step"],
                summary["target_epoch"],
                summary["target_train_wall_s"],
            )
    return summary


def draw_pictures(run_dir: Path) -> None:
    """`cnnjax.visualize`'s pictures of the run, with conf/visualize.yaml's settings."""
    from cnnjax import visualize  # it builds on this module

    settings = OmegaConf.load(CONF_DIR / "visualize.yaml")
    settings.run_dir = str(run_dir)
    log.info("\n".join(visualize.visualize(settings).lines))


class Recipe(NamedTuple):
    """What a config sets up before the loop: the model and its data, the step plan, the
    schedule and the initial state (weights from `trainer.seed`)."""

    model: nn.Module
    train_split: data.Split
    test_split: data.Split
    preprocess: Callable[[jnp.ndarray], jnp.ndarray]
    adaptation: str  # what `preprocess` does beyond scaling and normalising, in words
    table: analysis.Analysis
    steps_per_epoch: int
    total_steps: int
    schedule: optax.Schedule
    state: engine.TrainState
    rng: jax.Array  # dropout and augmentation


def prepare(cfg: DictConfig) -> Recipe:
    """Check `cfg`, load the data and initialise the model; bad geometry fails here, by layer
    name, before anything compiles."""
    t, ds = cfg.trainer, cfg.dataset
    if t.precision not in COMPUTE_DTYPES:
        raise ValueError(f"trainer.precision={t.precision!r}: use one of {sorted(COMPUTE_DTYPES)}")
    model = instantiate(cfg.model)
    train_split, test_split = load_dataset(cfg)
    target_hwc = (model.input_size, model.input_size, model.in_channels)
    source_hwc = train_split.images_NxHxWxC.shape[1:]
    preprocess, adaptation = data.make_preprocess(source_hwc, target_hwc, ds.mean, ds.std)

    n_train = len(train_split.labels_N)
    steps_per_epoch = n_train // t.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"trainer.batch_size={t.batch_size} exceeds the {n_train} training examples; lower it."
        )
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    schedule = instantiate(cfg.schedule)(cfg.optimizer.learning_rate, total_steps)
    tx = instantiate(cfg.optimizer)(learning_rate=schedule)
    if t.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), tx)

    table = analysis.analyze(model, (1, *target_hwc))
    init_rng, rng = jax.random.split(jax.random.key(t.seed))
    state = engine.create_train_state(model, tx, (1, *target_hwc), init_rng)
    return Recipe(
        model, train_split, test_split, preprocess, adaptation, table, steps_per_epoch,
        total_steps, schedule, state, rng,
    )  # fmt: skip


def epoch_order(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's batch order: a function of the seed and the epoch alone."""
    return np.random.default_rng([seed, epoch])


def epoch_plan(
    seed: int, n_train: int, batch_size: int, total_steps: int, start_step: int = 0
) -> Iterator[tuple[int, Iterator[np.ndarray]]]:
    """Each epoch from the one holding `start_step` on, with its index batches still to train
    (the order depends on the seed and the epoch alone, so a resumed run trains on the same
    batches); the last epoch ends at `total_steps`."""
    per_epoch = n_train // batch_size
    for epoch in range(start_step // per_epoch + 1, math.ceil(total_steps / per_epoch) + 1):
        first = (epoch - 1) * per_epoch  # steps before this epoch
        done = max(start_step - first, 0)
        order = epoch_order(seed, epoch)
        batches = data.epoch_batches(n_train, batch_size, order, skip=done)
        yield epoch, itertools.islice(batches, max(min(per_epoch, total_steps - first) - done, 0))


def train_and_evaluate(cfg: DictConfig, writer: RunWriter, stop: StopSignals) -> dict:
    """Set up from `cfg`, resume from the run directory's checkpoints when there are any, and
    loop; returns the summary fields it measured."""
    t, ds = cfg.trainer, cfg.dataset
    if not t.progress:
        tfds.disable_progress_bar()
    lay = parallel.layout(cfg.distributed.devices, HydraConfig.get().job.get("num") or 0)
    parallel.check_batch_size(t.batch_size, lay, "trainer.batch_size")
    parallel.check_batch_size(t.eval_batch_size, lay, "trainer.eval_batch_size")
    r = prepare(cfg)
    log.info("input adaptation for %s: %s", type(r.model).__name__, r.adaptation)
    for warning in r.table.warnings:
        log.warning(warning)
    checkpoints = checkpoint.Checkpoints(writer.run_dir / "checkpoints", t.keep_checkpoints)
    state, rng = parallel.replicate((r.state, r.rng), lay)
    state, rng, progress = resume(checkpoints, state, rng, t.resume, writer)
    n_params = engine.count_params(state.params)
    final = r.table.rows[-1]
    log.info(
        "%s: %s params, %.1f M MACs per image, final receptive field %s; "
        "%d train / %d test examples; %d steps (%d per epoch, batch %d over %d device(s) of %d "
        "process(es))",
        type(r.model).__name__,
        f"{n_params:,}",
        r.table.totals.macs / 1e6,
        "x".join(map(str, final.rf)),
        len(r.train_split.labels_N),
        len(r.test_split.labels_N),
        r.total_steps,
        r.steps_per_epoch,
        t.batch_size,
        lay.device_count,
        lay.process_count,
    )
    augment = data.make_augment(**(ds.get("augment") or {}))
    train_step = jax.jit(
        functools.partial(
            engine.train_step,
            preprocess=r.preprocess,
            augment=augment,
            label_smoothing=t.label_smoothing,
            compute_dtype=COMPUTE_DTYPES[t.precision],
        ),
        in_shardings=(lay.replicated, lay.batch, lay.replicated),
        out_shardings=lay.replicated,
        donate_argnums=0,
    )
    eval_step = jax.jit(
        functools.partial(engine.eval_step, preprocess=r.preprocess),
        in_shardings=(lay.replicated, lay.batch),
        out_shardings=lay.replicated,
    )

    loop = Loop(
        cfg.trainer, cfg.optimizer.learning_rate, r.schedule, writer, stop, checkpoints, lay
    )
    splits = (r.train_split, r.test_split)
    # the steps are traced inside; oneDNN's custom calls run on one device only
    with onednn.backend(t.conv_backend, lay.device_count) as conv_backend:
        log.info("convolutions: %s (trainer.conv_backend=%s)", conv_backend, t.conv_backend)
        loop.run(state, rng, progress, (train_step, eval_step), splits, r.total_steps)
    return {
        "conv_backend": conv_backend,
        "params": n_params,
        "macs": r.table.totals.macs,
        "receptive_field": list(final.rf),
        "input_adaptation": r.adaptation,
        **loop.results(),
    }


class Loop:
    """The training loop's moving parts: the state, the step, the metrics not yet fetched, the
    timing. Side effects go to the writer (metrics) and the checkpoints."""

    def __init__(
        self,
        trainer: DictConfig,
        learning_rate: float,
        schedule: optax.Schedule,
        writer: RunWriter,
        stop: StopSignals,
        checkpoints: checkpoint.Checkpoints,
        lay: parallel.Layout,
    ):
        self.t, self.lr, self.schedule = trainer, learning_rate, schedule
        self.writer, self.stop, self.checkpoints, self.lay = writer, stop, checkpoints, lay
        self.compile_s, self.window_images, self.rates = None, 0, []
        self.in_flight_limit = parallel.in_flight_limit(lay)
        self.start = self.window_start = time.perf_counter()

    def run(
        self, state, rng, progress: dict, steps: tuple, splits: tuple, total_steps: int
    ) -> None:
        """Train from `state` (with the `progress` its checkpoint recorded) to `total_steps`,
        evaluating and checkpointing; `steps` are the jitted train and eval steps."""
        (train_step, eval_step), (train_split, test_split) = steps, splits
        t, n_train = self.t, len(train_split.labels_N)
        self.state, self.rng, self.progress = state, rng, progress
        self.step, self.total_steps = int(state.step), total_steps
        self.steps_per_epoch = n_train // t.batch_size
        reached = self.progress.get("reached_target")  # by the run this one resumes
        if reached and (t.target_accuracy is None or reached["accuracy"] < t.target_accuracy):
            del self.progress["reached_target"]  # a higher target now, or none: train on
        # metrics of steps not yet logged, carried over when an interrupted run saved them
        carried = self.progress.pop("pending", [])
        self.pending = [{k: np.float32(v) for k, v in m.items()} for m in carried]
        self.eval = lambda: evaluate(eval_step, self.state, test_split, t.eval_batch_size, self.lay)
        self.bar = tqdm(
            total=total_steps, initial=self.step, unit="step", dynamic_ncols=True,
            disable=not (t.progress and self.writer.primary),  # process 0 shows progress
        )  # fmt: skip
        plan = epoch_plan(t.seed, n_train, t.batch_size, total_steps, self.step)
        rows = parallel.process_rows(self.lay, t.batch_size)
        for epoch, batches in plan:
            if self.finished():  # resumed from the final checkpoint, or the target was reached
                break
            for idx in batches:
                idx = idx[rows]  # this process's rows of the global batch
                images, labels = train_split.images_NxHxWxC[idx], train_split.labels_N[idx]
                batch = {"image": images, "label": labels}
                batch = parallel.shard_batch(self.lay, batch, t.batch_size)
                self.state, metrics = train_step(self.state, batch, self.rng)
                self.after_step(metrics)
            if epoch % t.eval_every == 0 or self.step == total_steps:
                self.evaluate(epoch)
            self.save()  # every epoch end, after its evaluation
            if self.stop.signal and not self.finished():
                raise self.interrupted()
        self.bar.close()
        self.checkpoints.close()

    def finished(self) -> bool:
        """All steps are done, or an evaluation reached `trainer.target_accuracy`."""
        return self.step >= self.total_steps or "reached_target" in self.progress

    def after_step(self, metrics: dict) -> None:
        """Count the step; fetch, log and checkpoint where due; stop when a signal came."""
        t, step = self.t, self.step + 1
        self.step = step
        self.bar.update()
        self.pending.append(metrics)
        if self.compile_s is None:  # the first call compiles; time it apart from throughput
            jax.block_until_ready(metrics)
            self.compile_s = time.perf_counter() - self.start
            self.window_start = time.perf_counter()
        else:
            self.window_images += t.batch_size
        if self.in_flight_limit and step % self.in_flight_limit == 0:
            jax.block_until_ready(metrics)
        epoch_end = step % self.steps_per_epoch == 0 or step == self.total_steps
        if step % t.log_every == 0 or step % t.checkpoint_every == 0 or epoch_end:
            self.flush()
        if step % t.checkpoint_every == 0 and not epoch_end:
            self.save()
        if self.stop.signal and not epoch_end:  # keep unlogged metrics: the resumed log is the same
            pending = self.fetch()
            self.save(pending=[{k: float(v) for k, v in m.items()} for m in pending])
            raise self.interrupted()

    def fetch(self) -> list[dict]:
        """The pending metrics on the host (the only host sync); a non-finite loss stops here."""
        self.pending = jax.device_get(self.pending)
        loss = float(np.mean([m["loss"] for m in self.pending])) if self.pending else 0.0
        if not math.isfinite(loss):
            first = self.step - len(self.pending) + 1
            raise self.diverged(f"the mean loss of steps {first}-{self.step} is {loss}")
        return self.pending

    def flush(self) -> None:
        """Fetch and check the pending metrics, write a train line."""
        if not self.pending:
            return
        pending = self.fetch()
        row = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
        now = time.perf_counter()
        rate = self.window_images / (now - self.window_start) if self.window_images else None
        if rate is not None:
            self.rates.append(rate)
        self.writer.metrics(
            step=self.step,
            epoch=self.epoch(),
            split="train",
            **row,
            learning_rate=float(self.schedule(self.step)),
            images_per_s=None if rate is None else round(rate, 1),
        )
        self.bar.set_postfix(
            loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}", img_s=f"{rate or 0:,.0f}"
        )
        self.pending, self.window_images, self.window_start = [], 0, now

    def evaluate(self, epoch: int) -> None:
        """Evaluate on the test split, log it, and note when it reaches the target accuracy."""
        test = self.eval()
        self.writer.metrics(step=self.step, epoch=self.epoch(), split="test", **test)
        self.progress["test"] = test
        if test["accuracy"] > self.progress["best_test_accuracy"]:
            self.progress |= {"best_test_accuracy": test["accuracy"], "best_epoch": epoch}
        if self.writer.primary:
            self.bar.write(
                f"epoch {epoch}: test loss {test['loss']:.4f}, accuracy {test['accuracy']:.4f}"
            )
        target = self.t.target_accuracy
        if target is not None and test["accuracy"] >= target:  # the loop stops at this epoch end
            self.progress["reached_target"] = {
                "accuracy": test["accuracy"],
                "step": self.step,
                "epoch": self.epoch(),
                "train_wall_s": round(time.perf_counter() - self.start, 2),
            }
        self.window_start = time.perf_counter()  # evaluation is not training throughput

    def save(self, **extra) -> None:
        """Checkpoint the state, unless an update made it non-finite: the last one stays good."""
        if not engine.all_finite(self.state.params):
            raise self.diverged(f"the parameters after step {self.step} are not finite")
        self.checkpoints.save(self.state, self.rng, {"step": self.step, **self.progress, **extra})

    def epoch(self) -> float:
        """Epochs done, fractional."""
        return round(self.step / self.steps_per_epoch, 4)

    def interrupted(self) -> Interrupted:
        return Interrupted(f"stopped by {self.stop.signal} at step {self.step}; checkpoint saved")

    def diverged(self, what: str) -> Diverged:
        good = self.checkpoints.steps()
        last = (
            f"The last good checkpoint is step {good[-1]} in {self.checkpoints.directory}."
            if good
            else "No checkpoint was written before it."
        )
        return Diverged(
            f"Training diverged: {what}. The learning rate ({self.lr}) is the likely cause: "
            f"lower it (optimizer.learning_rate=...) or add warm-up. {last}"
        )

    def results(self) -> dict:
        test = self.progress["test"] or self.eval()
        target = {}
        if self.t.target_accuracy is not None:
            reached = self.progress.get("reached_target") or {}
            target = {
                "target_accuracy": self.t.target_accuracy,
                "reached_target": bool(reached),
                **{f"target_{k}": reached.get(k) for k in ("step", "epoch", "train_wall_s")},
            }
        return {
            "steps": self.step,
            "epochs": self.epoch(),
            "batch_size": self.t.batch_size,
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "best_test_accuracy": self.progress["best_test_accuracy"],
            "best_epoch": self.progress["best_epoch"],
            "compile_s": None if self.compile_s is None else round(self.compile_s, 2),
            "images_per_s": round(float(np.median(self.rates)), 1) if self.rates else None,
            "train_wall_s": round(time.perf_counter() - self.start, 2),
            **target,
        }


def resume(
    checkpoints: checkpoint.Checkpoints,
    state: engine.TrainState,
    rng: jax.Array,
    allowed: bool,
    writer: RunWriter,
) -> tuple[engine.TrainState, jax.Array, dict]:
    """The latest checkpoint of the run directory, if any, with the progress it recorded; the
    metrics written after it are dropped (the resumed run writes them again)."""
    fresh = {"best_test_accuracy": -1.0, "best_epoch": None, "test": None}
    steps = checkpoints.steps()
    if not steps:
        return state, rng, fresh
    if not allowed:
        raise ValueError(
            f"{writer.run_dir} already holds checkpoints (steps {steps}) and trainer.resume is "
            "false: set trainer.resume=true to continue from them, or choose another "
            "hydra.run.dir to start over"
        )
    restored = checkpoints.restore_latest(state, rng)
    if restored is None:
        raise RuntimeError(
            f"none of the checkpoints in {writer.run_dir}/checkpoints (steps {steps}) can be "
            "read; delete that directory to start over"
        )
    state, rng, meta = restored
    step = meta.pop("step")
    writer.truncate_metrics(after_step=step)
    log.info("resuming from the checkpoint at step %d in %s", step, writer.run_dir)
    return state, rng, fresh | meta


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Entry point; returns the test accuracy (the objective of sweeps). In a sweep, a job that
    fails or diverges returns NaN (its summary.json says why) and the sweep goes on."""
    hydra_cfg = HydraConfig.get()
    try:
        return run(cfg, Path(hydra_cfg.runtime.output_dir)).get("test_accuracy", math.nan)
    except Exception:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        log.exception("job %s failed; the sweep goes on", hydra_cfg.job.num)
        return math.nan


if __name__ == "__main__":
    main()
