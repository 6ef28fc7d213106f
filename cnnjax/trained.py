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
from cnnjax.errors import RunDirError


class TrainedRun(NamedTuple):
    cfg: DictConfig  # the run's resolved config.yaml
    recipe: recipe.Recipe  # what training set up from it
    state: engine.TrainState  # restored from the checkpoint
    variables: dict  # the state's params and other collections (BatchNorm statistics)
    step: int  # of the checkpoint
    unreadable: dict[int, str]  # newer checkpoints that could not be read, and why
    conv_backend: str  # "xla" or "onednn": what its steps compute convolutions with


def load(run_dir: Path, conv_backend: str = "xla") -> TrainedRun:
    """The run's config, set up as training set it up (with the run's compilation cache, which
    holds training's compilations), and its latest readable checkpoint; its steps compute their
    convolutions with `conv_backend` ("xla", "onednn" or "auto", see `onednn.resolve`)."""
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
    backend = onednn.resolve(conv_backend)
    checkpoints = checkpoint.Checkpoints(directory, cfg.trainer.keep_checkpoints)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise RunDirError(f"{directory} holds no checkpoint; {fix}")
        runtime.use_compilation_cache(cfg.trainer.compilation_cache_dir)  # training's
        r = recipe.prepare(cfg, backend)
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
