"""`python -m cnnjax.train [overrides]`: wire config -> model, data, optimizer; loop; write the run.

The run directory (Hydra's) gets `config.yaml` (resolved), `metrics.jsonl` (one JSON object per
fetch: train lines every `trainer.log_every` steps, test lines after evaluations), TensorBoard
events, `checkpoints/` (orbax: every `trainer.checkpoint_every` steps, every epoch end and the
last step) and `summary.json`, whose `status` is "completed", "interrupted" (SIGTERM/Ctrl-C,
after a checkpoint), "diverged" or "failed". Running the same command in the same directory
resumes from the latest checkpoint and ends exactly as an uninterrupted run would.
"""

import functools
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tensorboardX import SummaryWriter
from tqdm import tqdm

from cnnjax import analysis, checkpoint, data, engine

log = logging.getLogger("cnnjax.train")
COMPUTE_DTYPES = {"fp32": None, "bf16": jnp.bfloat16}  # trainer.precision; parameters stay fp32


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: a checkpoint was saved and the run stops cleanly."""


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


class RunWriter:
    """The side effects of a run: metrics lines, TensorBoard events and the summary."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.events = SummaryWriter(str(run_dir))  # TensorBoard: tensorboard --logdir outputs

    def metrics(self, **row) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key not in ("step", "epoch", "split") and value is not None:
                self.events.add_scalar(f"{row['split']}/{key}", value, row["step"])
        self.events.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """Drop the lines of steps after `after_step` (a resumed run writes them again)."""
        if self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["step"] <= after_step]
            tmp = self.metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.metrics_path)

    def summary(self, **fields) -> None:
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(fields, indent=2) + "\n")
        tmp.replace(self.run_dir / "summary.json")  # atomic: never a half-written summary

    def close(self) -> None:
        self.events.close()


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


def evaluate(eval_fn, state: engine.TrainState, split: data.Split, batch_size: int) -> dict:
    """Mean loss and accuracy over the whole split."""
    sums = [eval_fn(state, batch) for batch in data.eval_batches(split, batch_size)]
    totals = {k: float(np.sum([s[k] for s in jax.device_get(sums)])) for k in sums[0]}
    return {
        "loss": totals["loss_sum"] / totals["count"],
        "accuracy": totals["correct"] / totals["count"],
    }


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train and evaluate as `cfg` says, writing into `run_dir`; returns the summary."""
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    writer = RunWriter(run_dir)
    summary = {
        "status": "running",
        "model": HydraConfig.get().runtime.choices["model"],
        "dataset": cfg.dataset.name,
        "run_dir": str(run_dir),
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
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
    return summary


def train_and_evaluate(cfg: DictConfig, writer: RunWriter, stop: StopSignals) -> dict:
    """Set up from `cfg`, resume from the run directory's checkpoints when there are any, and
    loop; returns the summary fields it measured."""
    t, ds = cfg.trainer, cfg.dataset
    if t.precision not in COMPUTE_DTYPES:
        raise ValueError(f"trainer.precision={t.precision!r}: use one of {sorted(COMPUTE_DTYPES)}")
    if not t.progress:
        tfds.disable_progress_bar()
    model = instantiate(cfg.model)
    train_split, test_split = load_dataset(cfg)
    target_hwc = (model.input_size, model.input_size, model.in_channels)
    source_hwc = train_split.images_NxHxWxC.shape[1:]
    preprocess, adaptation = data.make_preprocess(source_hwc, target_hwc, ds.mean, ds.std)
    log.info("input adaptation for %s: %s", type(model).__name__, adaptation)

    n_train = len(train_split.labels_N)
    steps_per_epoch = n_train // t.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"trainer.batch_size={t.batch_size} exceeds the {n_train} training examples; lower it."
        )
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    schedule = instantiate(cfg.schedule)(cfg.optimizer.learning_rate, total_steps)
    tx = instantiate(cfg.optimizer)(learning_rate=schedule)
    if t.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), tx)

    table = analysis.analyze(model, (1, *target_hwc))  # bad geometry fails here, by layer name
    for warning in table.warnings:
        log.warning(warning)
    init_rng, rng = jax.random.split(jax.random.key(t.seed))
    state = engine.create_train_state(model, tx, (1, *target_hwc), init_rng)
    checkpoints = checkpoint.Checkpoints(writer.run_dir / "checkpoints", t.keep_checkpoints)
    state, rng, progress = resume(checkpoints, state, rng, t.resume, writer)
    n_params = engine.count_params(state.params)
    final = table.rows[-1]
    log.info(
        "%s: %s params, %.1f M MACs per image, final receptive field %s; "
        "%d train / %d test examples; %d steps (%d per epoch, batch %d)",
        type(model).__name__,
        f"{n_params:,}",
        table.totals.macs / 1e6,
        "x".join(map(str, final.rf)),
        n_train,
        len(test_split.labels_N),
        total_steps,
        steps_per_epoch,
        t.batch_size,
    )
    augment = data.make_augment(**(ds.get("augment") or {}))
    train_step = jax.jit(
        functools.partial(
            engine.train_step,
            preprocess=preprocess,
            augment=augment,
            label_smoothing=t.label_smoothing,
            compute_dtype=COMPUTE_DTYPES[t.precision],
        ),
        donate_argnums=0,
    )
    eval_step = jax.jit(functools.partial(engine.eval_step, preprocess=preprocess))

    step = int(state.step)
    # metrics of steps not yet logged, carried over when an interrupted run saved them
    pending = [{k: np.float32(v) for k, v in m.items()} for m in progress.pop("pending", [])]
    compile_s, window_images, rates = None, 0, []
    train_start = window_start = time.perf_counter()
    bar = tqdm(
        total=total_steps, initial=step, disable=not t.progress, unit="step", dynamic_ncols=True
    )

    def diverged(what: str) -> Diverged:
        good = checkpoints.steps()
        last = (
            f"The last good checkpoint is step {good[-1]} in {checkpoints.directory}."
            if good
            else "No checkpoint was written before it."
        )
        return Diverged(
            f"Training diverged: {what}. The learning rate ({cfg.optimizer.learning_rate}) is "
            f"the likely cause: lower it (optimizer.learning_rate=...) or add warm-up. {last}"
        )

    def flush() -> None:
        """Fetch the pending metrics (the only host sync), check them, write a train line."""
        nonlocal pending, window_images, window_start
        if not pending:
            return
        pending = jax.device_get(pending)
        row = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
        now = time.perf_counter()
        rate = window_images / (now - window_start) if window_images else None
        if not math.isfinite(row["loss"]):
            raise diverged(
                f"the mean loss of steps {step - len(pending) + 1}-{step} is {row['loss']}"
            )
        if rate is not None:
            rates.append(rate)
        writer.metrics(
            step=step,
            epoch=round(step / steps_per_epoch, 4),
            split="train",
            **row,
            learning_rate=float(schedule(step)),
            images_per_s=None if rate is None else round(rate, 1),
        )
        bar.set_postfix(
            loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}", img_s=f"{rate or 0:,.0f}"
        )
        pending, window_images, window_start = [], 0, now

    def save(**extra) -> None:
        """Checkpoint the state, unless an update made it non-finite: the last one stays good."""
        if not engine.all_finite(state.params):
            raise diverged(f"the parameters after step {step} are not finite")
        checkpoints.save(state, rng, {"step": step, **progress, **extra})

    for epoch in range(step // steps_per_epoch + 1, n_epochs + 1):
        if step >= total_steps:  # resumed from the final checkpoint
            break
        done = step - (epoch - 1) * steps_per_epoch  # batches of this epoch already trained on
        order = np.random.default_rng([t.seed, epoch])  # the data order is a function of the epoch
        for idx in data.epoch_batches(n_train, t.batch_size, order, skip=done):
            batch = {"image": train_split.images_NxHxWxC[idx], "label": train_split.labels_N[idx]}
            state, metrics = train_step(state, batch, rng)
            step += 1
            bar.update()
            pending.append(metrics)
            if compile_s is None:  # the first call compiles; time it apart from throughput
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - train_start
                window_start = time.perf_counter()
            else:
                window_images += t.batch_size
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if step % t.log_every == 0 or step % t.checkpoint_every == 0 or epoch_end:
                flush()
            if step % t.checkpoint_every == 0 and not epoch_end:
                save()
            if stop.signal and not epoch_end:  # keep unlogged metrics: the resumed log is the same
                pending = jax.device_get(pending)
                if not math.isfinite(np.mean([m["loss"] for m in pending] or [0.0])):
                    raise diverged(
                        f"the loss of steps {step - len(pending) + 1}-{step} is not finite"
                    )
                save(pending=[{k: float(v) for k, v in m.items()} for m in pending])
                raise Interrupted(f"stopped by {stop.signal} at step {step}; checkpoint saved")
            if step == total_steps:
                break
        if epoch % t.eval_every == 0 or step == total_steps:
            test = evaluate(eval_step, state, test_split, t.eval_batch_size)
            writer.metrics(step=step, epoch=round(step / steps_per_epoch, 4), split="test", **test)
            progress["test"] = test
            if test["accuracy"] > progress["best_test_accuracy"]:
                progress |= {"best_test_accuracy": test["accuracy"], "best_epoch": epoch}
            bar.write(
                f"epoch {epoch}: test loss {test['loss']:.4f}, accuracy {test['accuracy']:.4f}"
            )
            window_start = time.perf_counter()  # evaluation is not training throughput
        save()  # every epoch end, after its evaluation
        if stop.signal and step < total_steps:
            raise Interrupted(f"stopped by {stop.signal} at step {step}; checkpoint saved")
    bar.close()
    checkpoints.close()
    test = progress["test"] or evaluate(eval_step, state, test_split, t.eval_batch_size)
    return {
        "params": n_params,
        "macs": table.totals.macs,
        "receptive_field": list(final.rf),
        "steps": step,
        "epochs": round(step / steps_per_epoch, 4),
        "batch_size": t.batch_size,
        "input_adaptation": adaptation,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "best_test_accuracy": progress["best_test_accuracy"],
        "best_epoch": progress["best_epoch"],
        "compile_s": None if compile_s is None else round(compile_s, 2),
        "images_per_s": round(float(np.median(rates)), 1) if rates else None,
        "train_wall_s": round(time.perf_counter() - train_start, 2),
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
    """Entry point; returns the test accuracy (the objective of sweeps)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return run(cfg, run_dir).get("test_accuracy", math.nan)


if __name__ == "__main__":
    main()
