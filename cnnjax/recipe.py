"""`prepare(cfg)`: the one place a composed config becomes objects (the model and its data, the
analysis table, the optimizer and schedule, the initial state, the steps and the loop's
settings). Bad geometry fails here, by layer name, before anything compiles."""

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnjax import analysis, batches, data, engine, models
from cnnjax.errors import ConfigError
from cnnjax.loop import Settings

# What defines a run (a rerun in its directory must agree on all of it): the model, the data
# (its content, not its location or name), the optimizer, the schedule and the trainer settings
# that change the weights. Not: epochs and max_steps (a run may be extended), evaluation, logging,
# checkpointing, the convolution backend or the devices.
DEFINING = (
    "model", "dataset", "optimizer", "schedule", "trainer.batch_size", "trainer.seed",
    "trainer.precision", "trainer.label_smoothing", "trainer.grad_clip_norm",
)  # fmt: skip
# Not defining either: where the data is and how it is named (`dataset.source` is its content,
# which also says whether it is IDX files or an image folder).
LOCATION = ("dataset.name", "dataset.data_dir", "dataset.source_dir", "dataset.apt_package",
            "dataset.class_names", "dataset.source_format")  # fmt: skip


class Recipe(NamedTuple):
    """What a config sets up before the loop."""

    model: nn.Module
    train_split: data.Split
    test_split: data.Split
    preprocess: Callable[[jnp.ndarray], jnp.ndarray]  # uint8 images -> the model's input
    adaptation: str  # what `preprocess` does beyond scaling and normalising, in words
    normalisation: dict[str, list[float]]  # the per-channel "mean" and "std" `preprocess` uses
    class_names: list[str]  # one per class
    table: analysis.Analysis
    schedule: optax.Schedule
    state: engine.TrainState  # weights from `trainer.seed`
    rng: jax.Array  # dropout and augmentation
    train_step: Callable  # engine.train_step with the recipe's options: jit it where it is called
    eval_step: Callable  # engine.eval_step likewise
    settings: Settings  # of the loop
    definition: dict  # what defines the run (see DEFINING), as flat dotted keys


def definition(cfg: DictConfig, source: str) -> dict:
    """What defines the run of `cfg` on data from `source` (its content), as flat dotted keys
    with JSON values: equal for a rerun that continues the same run."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif prefix not in LOCATION:
            flat[prefix] = value

    for key in DEFINING:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        walk(key, value)
    return flat | {"dataset.source": source}


def load_dataset(ds: DictConfig) -> data.Dataset:
    """The train and test splits the dataset config `ds` names, checked against it (not empty,
    image size, channels, labels below num_classes)."""
    source_dir = os.path.expanduser(ds.source_dir) if ds.source_dir else None
    splits = (ds.train_split, ds.test_split)
    folder = None
    if ds.get("source_format") == "image_folder":
        keys = ("image_size", "channels", "test_fraction", "split_seed")
        folder = {k: ds[k] for k in keys}
    dataset = data.load(ds.name, ds.data_dir, source_dir, splits, ds.apt_package, folder)
    for split, what in zip(dataset[:2], splits, strict=True):
        if not len(split.labels_N):
            raise data.DataError(
                f"The {ds.name} {what} split holds no examples ({dataset.source}): give it some."
            )
        data.check_fits(split, f"{ds.name} {what}", ds.image_size, ds.channels, ds.num_classes)
    return dataset


def class_names(ds: DictConfig, data_names: list[str]) -> list[str]:
    """The dataset config's `class_names` when it has one per class, else the data's own
    `data_names` (an image folder's class folders) when they are, else the indices."""
    for names in (ds.get("class_names"), data_names):
        if names and len(names) == ds.num_classes:
            return [str(n) for n in names]
    return [str(k) for k in range(ds.num_classes)]


def normalisation(ds: DictConfig, train: data.Split) -> dict[str, list[float]]:
    """The dataset config's per-channel mean and std; where either is null, the training
    images' own (scaled to [0, 1])."""
    if ds.mean is not None and ds.std is not None:
        return {"mean": list(ds.mean), "std": list(ds.std)}
    mean, std = batches.channel_stats(train.images_NxHxWxC)
    return {
        "mean": list(ds.mean) if ds.mean is not None else mean,
        "std": list(ds.std) if ds.std is not None else std,
    }


def data_facts(split: data.Split, ds: DictConfig, norm: dict[str, list[float]]) -> str:
    """The labels and the normalisation, in words, each named a suspect when it looks wrong:
    what a run that diverges in its first steps reports besides the learning rate."""
    classes = np.unique(split.labels_N)
    labels = f"the labels take {len(classes)} values, {classes.min()}-{classes.max()}, for "
    labels += f"dataset.num_classes={ds.num_classes}"
    if len(classes) < 2:
        labels += " (SUSPECT: one class only)"
    mean, std = np.asarray(norm["mean"], np.float64), np.asarray(norm["std"], np.float64)
    low, high = float(np.min(-mean / std)), float(np.max((1 - mean) / std))
    text = f"dataset.mean/std map pixels to [{low:.3g}, {high:.3g}]"
    if max(-low, high) > 10:  # standardised data lies within a few units of 0
        text += " (SUSPECT: set them to the training images' mean and std, per channel)"
    return f"{labels}; {text}"


def prepare(cfg: DictConfig, conv_backend: str = "xla") -> Recipe:
    """Check `cfg`, load the data, analyse and initialise the model; the steps compute their
    convolutions with `conv_backend` ("xla" or "onednn", see `onednn.resolve`)."""
    t, ds = cfg.trainer, cfg.dataset
    model = instantiate(cfg.model)
    dataset = load_dataset(ds)
    train_split, test_split = dataset.train, dataset.test
    norm = normalisation(ds, train_split)
    shape = models.input_shape(model)
    source_hwc = train_split.images_NxHxWxC.shape[1:]
    preprocess, adaptation = batches.make_preprocess(source_hwc, shape[1:], **norm)

    n_train = len(train_split.labels_N)
    steps_per_epoch = n_train // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} exceeds the {n_train} training examples: lower "
            f"it to {n_train} or less."
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
        compute_dtype=engine.COMPUTE_DTYPES[t.precision],
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
        data_facts=data_facts(train_split, ds, norm),
    )
    return Recipe(
        model, train_split, test_split, preprocess, adaptation, norm,
        class_names(ds, dataset.class_names), table, schedule, state, rng, train_step, eval_step,
        settings, definition(cfg, dataset.source),
    )  # fmt: skip
