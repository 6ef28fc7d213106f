"""Checkpoints of a run with orbax: everything needed to continue exactly.

A checkpoint holds the train state's arrays (parameters, optimizer state, batch statistics,
step) and the dropout/augmentation key as `state`, and JSON `meta` with the position in the data
order and the best test result so far. orbax writes each step into a temporary directory and
renames it when complete, so a crash mid-save never leaves a checkpoint that looks whole; one
that is damaged anyway is reported and the previous one is used.
"""

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from cnnjax.engine import TrainState

log = logging.getLogger("cnnjax.checkpoint")


def _arrays(state: TrainState, rng: jax.Array) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "model_state": state.model_state,
        "rng": jax.random.key_data(rng),
    }


class Checkpoints:
    """The checkpoints of one run directory: save every N steps and at the end, keep the last K."""

    def __init__(self, directory: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
        self.directory = directory.absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, rng: jax.Array, meta: dict) -> None:
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_arrays(state, rng)), meta=ocp.args.JsonSave(meta)
        )
        self.manager.save(step, args=args, force=True)

    def restore_latest(
        self, state: TrainState, rng: jax.Array
    ) -> tuple[TrainState, jax.Array, dict] | None:
        """The latest readable checkpoint into the structure of `state`, or None if there is
        none; a damaged one is reported and skipped for the one before it."""
        template = _arrays(state, rng)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        for step in reversed(self.steps()):
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            )
            try:
                restored = self.manager.restore(step, args=args)
            except Exception as e:  # orbax raises many types for a damaged directory
                log.warning(
                    "checkpoint %d in %s cannot be read (%s: %s); falling back to the one "
                    "before it",
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                )
                continue
            leaves = jax.tree.leaves(restored.state)
            arrays = jax.tree.unflatten(jax.tree.structure(template), leaves)
            state = state.replace(
                step=arrays["step"],
                params=arrays["params"],
                opt_state=arrays["opt_state"],
                model_state=arrays["model_state"],
            )
            return state, jax.random.wrap_key_data(arrays["rng"]), dict(restored.meta)
        return None

    def close(self) -> None:
        self.manager.close()
