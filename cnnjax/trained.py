"""A trained (or checkpointed) run, loaded from its directory: its config, everything training
set up from it, and the weights of its latest readable checkpoint."""

from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig

from cnnjax import checkpoint, recipe, rundir, runtime
from cnnjax.errors import RunDirError


class TrainedRun(NamedTuple):
    cfg: DictConfig  # the run's resolved config.yaml
    recipe: recipe.Recipe  # what training set up from it
    variables: dict  # restored: params and the other collections (BatchNorm statistics)
    step: int  # of the checkpoint
    unreadable: dict[int, str]  # newer checkpoints that could not be read, and why


def load(run_dir: Path) -> TrainedRun:
    """The run's config, set up as training set it up (with the run's compilation cache, which
    holds training's compilations), and its latest readable checkpoint."""
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
    checkpoints = checkpoint.Checkpoints(directory, cfg.trainer.keep_checkpoints)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise RunDirError(f"{directory} holds no checkpoint; {fix}")
        runtime.use_compilation_cache(cfg.trainer.compilation_cache_dir)  # training's
        r = recipe.prepare(cfg)
        restored = checkpoints.restore_latest(r.state, r.rng)
    finally:
        checkpoints.close()
    if restored is None:
        why = "; ".join(f"step {k}: {v}" for k, v in sorted(checkpoints.unreadable.items()))
        raise RunDirError(f"none of the checkpoints in {directory} can be read ({why}); {fix}")
    state, _, meta = restored
    variables = {"params": state.params, **state.model_state}
    return TrainedRun(cfg, r, variables, meta["step"], dict(checkpoints.unreadable))
