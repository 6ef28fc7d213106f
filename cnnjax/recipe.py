"""`prepare(cfg)`: the one place a composed config becomes objects (the model and its data, the
analysis table, the optimizer and schedule, the initial state, the steps and the loop's
settings). Bad geometry fails here, by layer name, before anything compiles."""

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from hydra.utils import instantiate
from omegaconf import DictConfig

from cnnjax import analysis, batches, data, engine, models
from cnnjax.loop import Settings

COMPUTE_DTYPES = {"fp32": None, "bf16": jnp.bfloat16}  # trainer.precision; parameters stay fp32


class Recipe(NamedTuple):
    """What a config sets up before the loop."""

    model: nn.Module
    train_split: data.Split
    test_split: data.Split
    preprocess: Callable[[jnp.ndarray], jnp.ndarray]  # uint8 images -> the model's input
    adaptation: str  # what `preprocess` does beyond scaling and normalising, in words
    table: analysis.Analysis
    schedule: optax.Schedule
    state: engine.TrainState  # weights from `trainer.seed`
    rng: jax.Array  # dropout and augmentation
    train_step: Callable  # engine.train_step with the recipe's options: jit it where it is called
    eval_step: Callable  # engine.eval_step likewise
    settings: Settings  # of the loop


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


def class_names(dataset: DictConfig) -> list[str]:
    """The dataset config's `class_names` when it has one per class, else the indices."""
    names = dataset.get("class_names")
    if names and len(names) == dataset.num_classes:
        return [str(n) for n in names]
    return [str(k) for k in range(dataset.num_classes)]


def prepare(cfg: DictConfig, conv_backend: str = "xla") -> Recipe:
    """Check `cfg`, load the data, analyse and initialise the model; the steps compute their
    convolutions with `conv_backend` ("xla" or "onednn", see `onednn.resolve`)."""
    t, ds = cfg.trainer, cfg.dataset
    if t.precision not in COMPUTE_DTYPES:
        raise ValueError(f"trainer.precision={t.precision!r}: use one of {sorted(COMPUTE_DTYPES)}")
    model = instantiate(cfg.model)
    train_split, test_split = load_dataset(cfg)
    shape = models.input_shape(model)
    source_hwc = train_split.images_NxHxWxC.shape[1:]
    preprocess, adaptation = batches.make_preprocess(source_hwc, shape[1:], ds.mean, ds.std)

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

    table = analysis.analyze(model, shape)
    init_rng, rng = jax.random.split(jax.random.key(t.seed))
    state = engine.create_train_state(model, tx, shape, init_rng)
    train_step = functools.partial(
        engine.train_step,
        preprocess=preprocess,
        augment=batches.make_augment(**(ds.get("augment") or {})),
        label_smoothing=t.label_smoothing,
        compute_dtype=COMPUTE_DTYPES[t.precision],
        conv_backend=conv_backend,
    )
    eval_step = functools.partial(
        engine.eval_step, preprocess=preprocess, conv_backend=conv_backend
    )
    settings = Settings(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        batch_size=t.batch_size,
        eval_batch_size=t.eval_batch_size,
        eval_every=t.eval_every,
        log_every=t.log_every,
        checkpoint_every=t.checkpoint_every,
        seed=t.seed,
        learning_rate=cfg.optimizer.learning_rate,
        schedule=schedule,
        target_accuracy=t.target_accuracy,
        progress_bar=t.progress,
    )
    return Recipe(
        model, train_split, test_split, preprocess, adaptation, table, schedule, state, rng,
        train_step, eval_step, settings,
    )  # fmt: skip
