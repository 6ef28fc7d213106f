"""A trained (or checkpointed) run, loaded from its directory: its config, everything training
set up from it and the weights of its latest readable checkpoint; evaluated on a split, asked
about image files, and its forward pass as a function of uint8 images (for export)."""

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from cnnjax import (
    checkpoint,
    engine,
    folders,
    loop,
    onednn,
    parallel,
    probe,
    recipe,
    rundir,
    runtime,
)
from cnnjax.data import Split
from cnnjax.errors import ConfigError, DataError, RunDirError


class TrainedRun(NamedTuple):
    cfg: DictConfig  # the run's resolved config.yaml
    recipe: recipe.Recipe  # what training set up from it
    state: engine.TrainState  # restored from the checkpoint
    variables: dict  # the state's params and other collections (BatchNorm statistics)
    step: int  # of the checkpoint
    unreadable: dict[int, str]  # newer checkpoints that could not be read, and why
    conv_backend: str  # "xla" or "onednn": what its steps compute convolutions with


def load(run_dir: Path, conv_backend: str | None = "xla") -> TrainedRun:
    """The run's config, set up as training set it up (with the run's compilation cache, which
    holds training's compilations), and its latest readable checkpoint; its steps compute their
    convolutions with `conv_backend` ("xla", "onednn", "auto", see `onednn.resolve`; None: the
    one the run trained with). RunDirError when the data its config names is not the data it
    was trained on."""
    if not run_dir.is_dir():
        problem = "is not a directory" if run_dir.exists() else "does not exist"
        raise RunDirError(
            f"run_dir={run_dir} {problem}: pass the directory of a `python -m cnnjax.train` run "
            "(outputs/<date>/<time>_<model>)"
        )
    cfg = rundir.read_config(run_dir)
    if cfg is None:
        raise RunDirError(
            f"{run_dir} holds no {rundir.CONFIG}, so it is not a training run directory: "
            f"`python -m cnnjax.train` writes {rundir.CONFIG} (the resolved config) when it "
            "starts; pass that run's directory, e.g. run_dir=outputs/<date>/<time>_<model>"
        )
    directory = run_dir / "checkpoints"
    fix = (
        f"run its training command again with hydra.run.dir={run_dir} (it resumes there) until "
        "it saves one: every trainer.checkpoint_every steps, every epoch end and the last step"
    )
    if not directory.is_dir():
        raise RunDirError(f"{run_dir} has no checkpoints/: the run saved none; {fix}")
    if conv_backend is None:
        conv_backend = _trained_backend(run_dir)
    backend = onednn.resolve(conv_backend)
    checkpoints = checkpoint.Checkpoints(directory, cfg.trainer.keep_checkpoints)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise RunDirError(f"{directory} holds no checkpoint; {fix}")
        runtime.use_compilation_cache(cfg.trainer.compilation_cache_dir)  # training's
        r = recipe.prepare(cfg, backend)
        changed = loop.differences(checkpoints.recorded_run() or r.definition, r.definition)
        if changed:  # e.g. files added to its image folder: another split, another normalisation
            raise RunDirError(
                f"{run_dir} was trained on other data or settings than its config gives now: "
                + "; ".join(changed)
                + ". Restore what it was trained on (the dataset's files), or train a new run."
            )
        restored = checkpoints.restore_latest(r.state, r.rng)
    finally:
        checkpoints.close()
    if restored is None:
        why = "; ".join(f"step {k}: {v}" for k, v in sorted(checkpoints.unreadable.items()))
        raise RunDirError(f"none of the checkpoints in {directory} can be read ({why}); {fix}")
    state, _, meta = restored
    variables = {"params": state.params, **state.model_state}
    unreadable = dict(checkpoints.unreadable)
    return TrainedRun(cfg, r, state, variables, meta["step"], unreadable, backend)


def _trained_backend(run_dir: Path) -> str:
    """The convolution backend the run's summary records ("auto" where it records none)."""
    try:
        return (rundir.read_summary(run_dir) or {}).get("conv_backend") or "auto"
    except ValueError:  # a torn summary
        return "auto"


def evaluation_split(
    run: TrainedRun, split: str, dataset: DictConfig | None = None
) -> tuple[Split, str]:
    """Split `split` ("test" or "train") of the run's own dataset, or of `dataset` (a dataset
    config), and the dataset's source; `dataset` must have the run's image shape, labels below
    its class count and, where both name their classes, the same names in the same order."""
    if split not in ("test", "train"):
        raise ConfigError(f"split={split!r}: use test or train")
    r = run.recipe
    if dataset is None:
        return (r.test_split if split == "test" else r.train_split), r.definition["dataset.source"]
    loaded = recipe.load_dataset(dataset)
    chosen = loaded.test if split == "test" else loaded.train
    trained_hwc = r.train_split.images_NxHxWxC.shape[1:]
    if chosen.images_NxHxWxC.shape[1:] != trained_hwc:
        shape = "x".join(map(str, chosen.images_NxHxWxC.shape[1:]))
        raise DataError(
            f"dataset {dataset.name}'s images are {shape}, but the run was trained on "
            f"{'x'.join(map(str, trained_hwc))} images: give it a dataset of that shape (for an "
            "image folder, set dataset.image_size and dataset.channels to the run's)."
        )
    names = recipe.class_names(dataset, loaded.class_names)
    if names != r.class_names and names != [str(k) for k in range(len(names))]:  # named others
        raise DataError(
            f"dataset {dataset.name}'s classes are {names}, the run's {r.class_names}: labels "
            "are compared by position, so the two must name the same classes in the same order."
        )
    if len(chosen.labels_N) and int(chosen.labels_N.max()) >= len(r.class_names):
        raise DataError(
            f"dataset {dataset.name} has labels up to {int(chosen.labels_N.max())}, but the run "
            f"knows {len(r.class_names)} classes."
        )
    return chosen, loaded.source


def logits(run: TrainedRun, images_NxHxWxC: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The run's float32 logits (N, K) of uint8 images of its dataset's shape, in eval mode."""
    r = run.recipe
    return probe.logits(
        r.state.apply_fn, run.variables, r.preprocess, images_NxHxWxC, batch_size,
        run.conv_backend,
    )  # fmt: skip


def evaluate(run: TrainedRun, split: Split, batch_size: int) -> tuple[dict, np.ndarray]:
    """Accuracy and loss over `split` (computed as training's evaluations compute them), the
    accuracy of each class and the confusion matrix; and the logits of every example."""
    lay = parallel.layout(0)  # one device, as the convolution backend may need
    eval_step = jax.jit(
        run.recipe.eval_step, in_shardings=(lay.replicated, lay.batch), out_shardings=lay.replicated
    )
    metrics = loop.evaluate(eval_step, run.state, split, batch_size, lay)
    out = logits(run, split.images_NxHxWxC, batch_size)
    names = run.recipe.class_names
    matrix = probe.confusion_matrix(split.labels_N, out.argmax(-1), len(names))
    per_class = {
        name: (float(matrix[k, k] / matrix[k].sum()) if matrix[k].sum() else None)
        for k, name in enumerate(names)
    }
    return {
        "examples": len(split.labels_N),
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
        "class_names": names,
    }, out


def probabilities(logits_NxK: np.ndarray) -> np.ndarray:
    """Softmax, in float64."""
    z = logits_NxK.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def top_classes(run: TrainedRun, paths: list[Path], top_k: int, batch_size: int) -> dict:
    """Each readable file's `top_k` classes with their probabilities, and why the others could
    not be read."""
    images, read, failed = read_images(run, paths)
    probs = probabilities(logits(run, images, batch_size)) if read else []
    names = run.recipe.class_names
    rows = []
    for path, p in zip(read, probs, strict=True):
        best = p.argsort()[::-1][:top_k]
        rows.append({"file": str(path),
                     "top": [{"class": names[k], "index": int(k), "probability": float(p[k])}
                             for k in best]})  # fmt: skip
    return {"predictions": rows, "unreadable": {str(k): v for k, v in failed.items()}}


def read_images(run: TrainedRun, paths: list[Path]) -> tuple[np.ndarray, list[Path], dict]:
    """The image files decoded as the run's training images were (`folders.decode` at its
    dataset's image_size and channels), the paths read, and why each other one could not be."""
    ds = run.cfg.dataset
    images, read, failed = [], [], {}
    for path in paths:
        try:
            images.append(folders.decode(path, ds.image_size, ds.channels))
            read.append(path)
        except folders.UNREADABLE as e:
            failed[path] = str(e)
    shape = (0, ds.image_size, ds.image_size, ds.channels)
    return (np.stack(images) if images else np.zeros(shape, np.uint8)), read, failed


def forward(run: TrainedRun) -> tuple[Callable[[jnp.ndarray], jnp.ndarray], tuple[int, ...]]:
    """The run's eval-mode forward pass with its weights as constants, uint8 images (B, H, W, C)
    of its dataset's shape -> float32 logits (B, K), through XLA's convolutions (no custom
    calls: what an exported program can hold); and the shape of one image."""
    r, variables = run.recipe, run.variables

    def logits_of(images_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
        x = r.preprocess(images_BxHxWxC)
        return r.state.apply_fn(variables, x, train=False).astype(jnp.float32)

    return onednn.using("xla", logits_of), tuple(r.train_split.images_NxHxWxC.shape[1:])
