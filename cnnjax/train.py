"""`python -m cnnjax.train [overrides]`: wire config -> model, data, optimizer; loop; write the run.

The run directory (Hydra's) gets `config.yaml` (resolved), `metrics.jsonl` (one JSON object per
fetch: train lines every `trainer.log_every` steps, test lines after evaluations) and
`summary.json`, which is rewritten with `status` "failed" or "diverged" when a run stops early.
"""

import functools
import json
import logging
import math
import os
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
from tqdm import tqdm

from cnnjax import analysis, data, engine

log = logging.getLogger("cnnjax.train")
COMPUTE_DTYPES = {"fp32": None, "bf16": jnp.bfloat16}  # trainer.precision; parameters stay fp32


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


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
    """The side effects of a run: metrics lines, the summary and the log."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"

    def metrics(self, **row) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def summary(self, **fields) -> None:
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(fields, indent=2) + "\n")
        tmp.replace(self.run_dir / "summary.json")  # atomic: never a half-written summary


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
        summary |= train_and_evaluate(cfg, writer)
        summary["status"] = "completed"
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


def train_and_evaluate(cfg: DictConfig, writer: RunWriter) -> dict:
    """The loop; returns the summary fields it measured."""
    t, ds = cfg.trainer, cfg.dataset
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
    init_rng, dropout_rng = jax.random.split(jax.random.key(t.seed))
    state = engine.create_train_state(model, tx, (1, *target_hwc), init_rng)
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
    if t.precision not in COMPUTE_DTYPES:
        raise ValueError(f"trainer.precision={t.precision!r}: use one of {sorted(COMPUTE_DTYPES)}")
    augment = data.make_augment(**ds.augment)
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

    shuffle_rng = np.random.default_rng(t.seed)
    step, compile_s, pending = 0, None, []
    train_start = window_start = time.perf_counter()
    window_images, images_per_s = 0, []
    best = {"accuracy": -1.0}
    test = None
    bar = tqdm(total=total_steps, disable=not t.progress, unit="step", dynamic_ncols=True)
    for epoch in range(1, n_epochs + 1):
        for idx in data.epoch_batches(n_train, t.batch_size, shuffle_rng):
            batch = {
                "image": train_split.images_NxHxWxC[idx],
                "label": train_split.labels_N[idx],
            }
            state, metrics = train_step(state, batch, dropout_rng)
            step += 1
            bar.update()
            if compile_s is None:  # the first call compiles; time it apart from throughput
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - train_start
                window_start = time.perf_counter()
                continue
            pending.append(metrics)
            window_images += t.batch_size
            if step % t.log_every == 0 or step == total_steps:
                row = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in metrics}
                rate = window_images / (time.perf_counter() - window_start)
                images_per_s.append(rate)
                if not math.isfinite(row["loss"]):
                    raise Diverged(
                        f"Training diverged: the mean loss of steps {step - len(pending) + 1}-"
                        f"{step} is {row['loss']}. The learning rate "
                        f"({cfg.optimizer.learning_rate}) is the likely cause: lower it "
                        "(e.g. optimizer.learning_rate=...) or add warm-up."
                    )
                writer.metrics(
                    step=step,
                    epoch=round(step / steps_per_epoch, 4),
                    split="train",
                    **row,
                    learning_rate=float(schedule(step)),
                    images_per_s=round(rate, 1),
                )
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}", img_s=f"{rate:,.0f}"
                )
                pending, window_images, window_start = [], 0, time.perf_counter()
            if step == total_steps:
                break
        if epoch % t.eval_every == 0 or step == total_steps:
            test = evaluate(eval_step, state, test_split, t.eval_batch_size)
            writer.metrics(step=step, epoch=round(step / steps_per_epoch, 4), split="test", **test)
            if test["accuracy"] > best["accuracy"]:
                best = {"accuracy": test["accuracy"], "epoch": epoch}
            bar.write(
                f"epoch {epoch}: test loss {test['loss']:.4f}, accuracy {test['accuracy']:.4f}"
            )
            window_start = time.perf_counter()  # evaluation is not training throughput
        if step == total_steps:
            break
    bar.close()
    train_wall_s = time.perf_counter() - train_start
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
        "best_test_accuracy": best["accuracy"],
        "best_epoch": best.get("epoch"),
        "compile_s": round(compile_s, 2),
        "images_per_s": round(float(np.median(images_per_s)), 1) if images_per_s else None,
        "train_wall_s": round(train_wall_s, 2),
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Entry point; returns the test accuracy (the objective of sweeps)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return run(cfg, run_dir)["test_accuracy"]


if __name__ == "__main__":
    main()
