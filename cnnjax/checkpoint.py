"""Checkpoints of a run with orbax: everything needed to continue exactly.

A checkpoint holds the train state's arrays (parameters, optimizer state, batch statistics,
step) and the dropout/augmentation key as `state`, and JSON `meta`: the position in the data
order, the best test result so far and what defines the run (`run`). orbax writes each step into
a temporary directory and renames it when complete, so a crash mid-save never leaves a checkpoint
that looks whole; one that is damaged anyway is reported in one line, the previous one is used,
and it is written anew when its step comes again.
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


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


class Checkpoints:
    """The checkpoints of one run directory: save every N steps and at the end, keep the last K;
    every one records `run`, the definition of the run it belongs to."""

    def __init__(self, directory: Path, keep: int, run: dict | None = None):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
        self.directory = directory.absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.run = run
        self.unreadable: dict[int, str] = {}  # step: why it cannot be read (it is saved anew)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, rng: jax.Array, meta: dict) -> None:
        step = int(state.step)
        if step in self.manager.all_steps():
            if step not in self.unreadable:
                return
            self.manager.delete(step)  # damaged: this save replaces it
            del self.unreadable[step]
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_arrays(state, rng)),
            meta=ocp.args.JsonSave({**meta, "run": self.run}),
        )
        self.manager.save(step, args=args, force=True)

    def recorded_run(self) -> dict | None:
        """The run definition the newest readable checkpoint records (None: none records one,
        as those of older versions)."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        for step in reversed(self.steps()):
            try:
                return dict(self.manager.restore(step, args=args).meta).get("run")
            except Exception:  # damaged: restore_latest reports it
                continue
        return None

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
                self.unreadable[step] = _first_line(e)
                log.warning(
                    "checkpoint %d in %s cannot be read (%s); falling back to the one before it",
                    step, self.directory, self.unreadable[step],
                )  # fmt: skip
                continue
            leaves = jax.tree.leaves(restored.state)
            arrays = jax.tree.unflatten(jax.tree.structure(template), leaves)
            state = state.replace(
                step=arrays["step"],
                params=arrays["params"],
                opt_state=arrays["opt_state"],
                model_state=arrays["model_state"],
            )
            meta = {k: v for k, v in dict(restored.meta).items() if k != "run"}
            return state, jax.random.wrap_key_data(arrays["rng"]), meta
        return None

    def close(self) -> None:
        self.manager.close()
