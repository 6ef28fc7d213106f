"""The epoch loop: train, fetch metrics, evaluate, checkpoint, resume, stop on a signal.

The steps are the engine's, jitted by the caller; this module holds the loop's side effects. What
a run needs to continue exactly (the state, the key and `Progress`) goes into every checkpoint;
metrics stay on the device until a fetch (every `log_every` steps, each checkpoint and epoch end),
which is also where a non-finite loss is caught.
"""

import dataclasses
import importlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from cnnjax import batches, checkpoint, engine, parallel
from cnnjax.data import Split
from cnnjax.errors import CnnjaxError, RunDirError
from cnnjax.rundir import RunWriter

log = logging.getLogger("cnnjax.loop")
FIRST_STEPS = 10  # a run non-finite this early has the data named among the suspects


class Diverged(CnnjaxError, RuntimeError):
    """The loss or the parameters became NaN or infinite; the message says what to change."""


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: a checkpoint was saved and the run stops cleanly."""


class _NonFinite(ArithmeticError):
    """What went non-finite from `first_step` on, before the loop adds its advice."""

    def __init__(self, what: str, first_step: int):
        super().__init__(what)
        self.first_step = first_step


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


@dataclass(frozen=True)
class Settings:
    """What the loop is asked to do (from the trainer config)."""

    total_steps: int
    steps_per_epoch: int
    batch_size: int  # global: split over every device
    eval_batch_size: int
    eval_every: int  # epochs between test evaluations (the last step always evaluates)
    log_every: int  # steps between metric fetches
    checkpoint_every: int  # steps between checkpoints (every epoch end saves one too)
    seed: int  # of the epochs' batch order
    learning_rate: float  # the configured peak, named when the run diverges
    schedule: Callable[[int], float]  # the learning rate of each step, logged
    target_accuracy: float | None = None  # stop after the first evaluation reaching it
    progress_bar: bool = True
    data_facts: str = ""  # labels and normalisation, named when a run diverges at once

    def epoch(self, step: int) -> float:
        """Epochs done after `step` steps, fractional."""
        return round(step / self.steps_per_epoch, 4)


@dataclass
class Progress:
    """What a checkpoint records besides the arrays (its JSON): the last and the best test
    result, when the target was reached, and after a signal the metrics not yet logged."""

    best_test_accuracy: float = -1.0
    best_epoch: int | None = None
    test: dict | None = None  # loss and accuracy of the last evaluation
    reached_target: dict | None = None  # accuracy, step, epoch, train_wall_s
    pending: list[dict] = field(default_factory=list)

    def meta(self, step: int) -> dict:
        """The checkpoint's JSON; keys without a value are left out."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("pending",)}
        if fields["reached_target"] is None:
            del fields["reached_target"]
        return {"step": step, **fields, **({"pending": self.pending} if self.pending else {})}

    @classmethod
    def from_meta(cls, meta: dict) -> tuple[int, "Progress"]:
        """The step and progress of a checkpoint's JSON."""
        names = {f.name for f in dataclasses.fields(cls)}
        return meta["step"], cls(**{k: v for k, v in meta.items() if k in names})

    def record_test(self, test: dict, epoch: int, target: float | None, when: dict) -> None:
        """A test evaluation at the end of `epoch`: the last and the best result, and the first
        to reach `target` (`when`: its step, epoch and train_wall_s)."""
        self.test = test
        if test["accuracy"] > self.best_test_accuracy:
            self.best_test_accuracy, self.best_epoch = test["accuracy"], epoch
        if target is not None and self.reached_target is None and test["accuracy"] >= target:
            self.reached_target = {"accuracy": test["accuracy"], **when}

    def retarget(self, target: float | None) -> None:
        """Forget a target the resumed run reached when this run has a higher one or none."""
        reached = self.reached_target
        if reached and (target is None or reached["accuracy"] < target):
            self.reached_target = None

    def target_fields(self, target: float | None) -> dict:
        """The summary's fields about the target accuracy (none without a target)."""
        if target is None:
            return {}
        reached = self.reached_target or {}
        return {
            "target_accuracy": target,
            "reached_target": bool(reached),
            **{f"target_{k}": reached.get(k) for k in ("step", "epoch", "train_wall_s")},
        }


@dataclass
class Clock:
    """The loop's wall time: its start, the first step's compile time (apart from throughput)
    and the images/s of each train line."""

    start: float = field(default_factory=time.perf_counter)
    compile_s: float | None = None
    rates: list[float] = field(default_factory=list)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.start, 2)

    def fields(self) -> dict:
        """The summary's timing fields."""
        return {
            "compile_s": None if self.compile_s is None else round(self.compile_s, 2),
            "images_per_s": round(float(np.median(self.rates)), 1) if self.rates else None,
            "train_wall_s": self.elapsed(),
        }


class Start(NamedTuple):
    """Where a run starts: a new state, or the one its latest checkpoint holds."""

    state: engine.TrainState
    rng: jax.Array  # dropout and augmentation
    progress: Progress


@dataclass(frozen=True)
class Steps:
    """The jitted steps: `train(state, batch, rng) -> (state, metrics)` (state donated) and
    `eval(state, batch) -> sums`."""

    train: Callable
    eval: Callable


class MetricsWindow:
    """The metrics of the steps since the last fetch, left on the device, and the images
    trained since the window opened (the throughput of the window)."""

    def __init__(self, carried: list[dict]):
        self.pending = [{k: np.float32(v) for k, v in m.items()} for m in carried]
        self.images, self.opened = 0, time.perf_counter()

    def add(self, metrics: dict, images: int) -> None:
        self.pending.append(metrics)
        self.images += images

    def fetch(self, step: int) -> list[dict]:
        """The pending metrics on the host (the loop's only host sync); _NonFinite when their
        mean loss is NaN or infinite."""
        self.pending = jax.device_get(self.pending)
        loss = float(np.mean([m["loss"] for m in self.pending])) if self.pending else 0.0
        if not math.isfinite(loss):
            first = step - len(self.pending) + 1
            raise _NonFinite(f"the mean loss of steps {first}-{step} is {loss}", first)
        return self.pending

    def close(self, step: int) -> tuple[dict, float | None]:
        """The mean of each metric and the images per second since the window opened; then a
        new window opens."""
        pending, now = self.fetch(step), time.perf_counter()
        row = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
        rate = self.images / (now - self.opened) if self.images else None
        self.reopen(now)
        return row, rate

    def reopen(self, now: float) -> None:
        """Empty the window; throughput counts from `now` (after compiling or evaluating)."""
        self.pending, self.images, self.opened = [], 0, now


def evaluate(
    eval_step: Callable,
    state: engine.TrainState,
    split: Split,
    batch_size: int,
    lay: parallel.Layout,
) -> dict:
    """Mean loss and accuracy over the whole split; each process feeds its rows of every batch."""
    rows, limit = parallel.process_rows(lay, batch_size), parallel.in_flight_limit(lay)
    sums = []
    for i, batch in enumerate(batches.eval_batches(split, batch_size), 1):
        mine = {k: v[rows] for k, v in batch.items()}
        sums.append(eval_step(state, parallel.shard_batch(lay, mine, batch_size)))
        if limit and i % limit == 0:
            jax.block_until_ready(sums[-1])
    totals = {k: float(np.sum([s[k] for s in jax.device_get(sums)])) for k in sums[0]}
    return {
        "loss": totals["loss_sum"] / totals["count"],
        "accuracy": totals["correct"] / totals["count"],
    }


def _model_defaults(target: object) -> dict:
    """`model.<field>` -> the default of each field of the model class `target` names (a Hydra
    `_target_`), as JSON values; {} when it cannot be imported."""
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return {}
    fields = getattr(cls, "__dataclass_fields__", {}).items()
    defaults = {k: f.default for k, f in fields if f.default is not dataclasses.MISSING}
    return {f"model.{k}": json.loads(json.dumps(v)) for k, v in defaults.items()
            if isinstance(v, int | float | str | bool | tuple | list | None)}  # fmt: skip


def differences(recorded: dict, current: dict) -> list[str]:
    """The keys of two run definitions that differ: "key: <current> here, <recorded> there".
    A model field added to its class after the run was recorded counts at its default there."""
    added = _model_defaults(current.get("model._target_")).items()
    recorded = {k: v for k, v in added if k in current and k not in recorded} | recorded
    missing = "(unset)"
    keys = sorted(set(recorded) | set(current))
    return [
        f"{k}: {current.get(k, missing)!r} here, {recorded.get(k, missing)!r} there"
        for k in keys
        if recorded.get(k, missing) != current.get(k, missing)
    ]


def resume(
    checkpoints: checkpoint.Checkpoints,
    state: engine.TrainState,
    rng: jax.Array,
    s: Settings,
    allowed: bool,
    recorded: dict | None,
) -> Start:
    """Where the run continues: the latest readable checkpoint with the progress it recorded,
    or `state` and `rng` when there is none. A directory whose run is another (`recorded`, its
    definition, differs from `checkpoints.run`), whose checkpoints cannot be read, that has
    trained more steps than asked, or that may not be resumed (`allowed` false) is refused
    with a RunDirError before anything is written."""
    run_dir = checkpoints.directory.parent
    recorded = checkpoints.recorded_run() or recorded
    changed = differences(recorded, checkpoints.run) if recorded is not None else []
    if changed:
        raise RunDirError(
            f"{run_dir} holds another run: "
            + "; ".join(changed)
            + ". A run resumes only with the settings that define it: run again with those, or "
            "give this run another hydra.run.dir."
        )
    steps = checkpoints.steps()
    if not steps:
        return Start(state, rng, Progress())
    if not allowed:
        raise RunDirError(
            f"{run_dir} already holds checkpoints (steps {steps}) and trainer.resume is false: "
            "set trainer.resume=true to continue from them, or give this run another "
            "hydra.run.dir to start over."
        )
    if recorded is None:
        log.warning(
            "the checkpoints in %s do not record the run's settings (an older cnnjax wrote "
            "them): resuming without checking that they are this run's", run_dir,
        )  # fmt: skip
    restored = checkpoints.restore_latest(state, rng)
    if restored is None:
        raise RunDirError(
            f"none of the checkpoints in {checkpoints.directory} (steps {steps}) can be read: "
            "delete that directory to train this run from the start, or give it another "
            "hydra.run.dir."
        )
    state, rng, meta = restored
    step, progress = Progress.from_meta(meta)
    if step > s.total_steps:
        raise RunDirError(
            f"{run_dir} has trained {step} steps, more than the {s.total_steps} this run asks "
            f"for (trainer.epochs / trainer.max_steps): ask for at least {step}, or give this "
            "run another hydra.run.dir."
        )
    log.info("resuming from the checkpoint at step %d in %s", step, run_dir)
    return Start(state, rng, progress)


def diverged(
    what: str, learning_rate: float, checkpoints: checkpoint.Checkpoints, data_facts: str = ""
) -> Diverged:
    """The error of a run that went non-finite: what did, the likely causes (`data_facts`: the
    labels and normalisation, for a run that diverged in its first steps) and the last good
    checkpoint."""
    good = checkpoints.steps()
    last = (
        f"The last good checkpoint is step {good[-1]} in {checkpoints.directory}."
        if good
        else "No checkpoint was written before it."
    )
    cause = f"The learning rate ({learning_rate}) is the likely cause"
    if data_facts:
        cause = (
            f"It went wrong in the first steps: suspect the data as much as the learning rate "
            f"({learning_rate}): {data_facts}. Otherwise"
        )
    return Diverged(
        f"Training diverged: {what}. {cause}: lower the learning rate "
        f"(optimizer.learning_rate=...) or add warm-up. {last}"
    )


class Loop:
    """A run's training loop from `start`. Everything it reads is given here; it changes the
    train state, its `Progress` and the files of the writer and the checkpoints."""

    def __init__(
        self,
        s: Settings,
        steps: Steps,
        splits: tuple[Split, Split],
        lay: parallel.Layout,
        writer: RunWriter,
        checkpoints: checkpoint.Checkpoints,
        stop: StopSignals,
        start: Start,
    ):
        self.s, self.steps, (self.train_split, self.test_split) = s, steps, splits
        self.lay, self.writer, self.checkpoints, self.stop = lay, writer, checkpoints, stop
        self.state, self.rng, self.progress = start
        self.progress.retarget(s.target_accuracy)
        self.step = int(self.state.step)
        self.window = MetricsWindow(carried=self.progress.pending)  # saved by an interrupt
        self.progress.pending = []
        self.clock = Clock()
        self.in_flight_limit = parallel.in_flight_limit(lay)  # steps queued before a wait
        self.bar = tqdm(
            total=s.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
            disable=not (s.progress_bar and writer.primary),  # process 0 shows progress
        )  # fmt: skip

    def run(self) -> dict:
        """Train to the last step (or the target accuracy), evaluating and checkpointing; the
        summary's fields. Raises Interrupted after a signal (a checkpoint saved) and Diverged
        when the loss or the parameters become non-finite."""
        try:
            self._epochs()
        except _NonFinite as e:
            early = e.first_step <= max(FIRST_STEPS, self.s.log_every)  # at the first fetch
            facts = self.s.data_facts if early else ""
            raise diverged(str(e), self.s.learning_rate, self.checkpoints, facts) from None
        finally:
            self.bar.close()
        test = self.progress.test or self._test()
        return {
            "steps": self.step,
            "epochs": self.s.epoch(self.step),
            "batch_size": self.s.batch_size,
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "best_test_accuracy": self.progress.best_test_accuracy,
            "best_epoch": self.progress.best_epoch,
            **self.clock.fields(),
            **self.progress.target_fields(self.s.target_accuracy),
        }

    def _epochs(self) -> None:
        s, rows = self.s, parallel.process_rows(self.lay, self.s.batch_size)
        images, labels = self.train_split.images_NxHxWxC, self.train_split.labels_N
        plan = batches.epoch_plan(s.seed, len(labels), s.batch_size, s.total_steps, self.step)
        for epoch, indices in plan:
            if self._finished():  # resumed from the final checkpoint, or the target was reached
                break
            for idx in indices:
                idx = idx[rows]  # this process's rows of the global batch
                batch = {"image": images[idx], "label": labels[idx]}
                batch = parallel.shard_batch(self.lay, batch, s.batch_size)
                self.state, metrics = self.steps.train(self.state, batch, self.rng)
                self._after_step(metrics)
            if epoch % s.eval_every == 0 or self.step == s.total_steps:
                self._evaluate(epoch)
            self._save()  # every epoch end, after its evaluation
            if self.stop.signal and not self._finished():
                raise self._interrupted()

    def _finished(self) -> bool:
        """All steps are done, or an evaluation reached the target accuracy."""
        return self.step >= self.s.total_steps or self.progress.reached_target is not None

    def _after_step(self, metrics: dict) -> None:
        """Count the step; fetch, log and checkpoint where due; stop when a signal came."""
        s, step = self.s, self.step + 1
        self.step = step
        self.bar.update()
        if self.clock.compile_s is None:  # the first call compiles: time it apart
            jax.block_until_ready(metrics)
            self.clock.compile_s = time.perf_counter() - self.clock.start
            self.window.add(metrics, images=0)
            self.window.opened = time.perf_counter()
        else:
            self.window.add(metrics, images=s.batch_size)
        if self.in_flight_limit and step % self.in_flight_limit == 0:
            jax.block_until_ready(metrics)
        epoch_end = step % s.steps_per_epoch == 0 or step == s.total_steps
        if step % s.log_every == 0 or step % s.checkpoint_every == 0 or epoch_end:
            self._log_train()
        if step % s.checkpoint_every == 0 and not epoch_end:
            self._save()
        if self.stop.signal and not epoch_end:  # keep unlogged metrics: the resumed log is the same
            pending = self.window.fetch(step)
            self.progress.pending = [{k: float(v) for k, v in m.items()} for m in pending]
            self._save()
            raise self._interrupted()

    def _log_train(self) -> None:
        """A train line: the window's mean metrics, the learning rate and the throughput."""
        if not self.window.pending:
            return
        row, rate = self.window.close(self.step)
        if rate is not None:
            self.clock.rates.append(rate)
        self.writer.metrics(
            step=self.step,
            epoch=self.s.epoch(self.step),
            split="train",
            **row,
            learning_rate=float(self.s.schedule(self.step)),
            images_per_s=None if rate is None else round(rate, 1),
        )
        self.bar.set_postfix(
            loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}", img_s=f"{rate or 0:,.0f}"
        )

    def _test(self) -> dict:
        """The test split's loss and accuracy now."""
        s = self.s
        return evaluate(self.steps.eval, self.state, self.test_split, s.eval_batch_size, self.lay)

    def _evaluate(self, epoch: int) -> None:
        """Evaluate on the test split, log it and record it (the loop stops at this epoch's end
        when it reaches the target accuracy)."""
        test, epochs = self._test(), self.s.epoch(self.step)
        self.writer.metrics(step=self.step, epoch=epochs, split="test", **test)
        when = {"step": self.step, "epoch": epochs, "train_wall_s": self.clock.elapsed()}
        self.progress.record_test(test, epoch, self.s.target_accuracy, when)
        if self.writer.primary:
            self.bar.write(
                f"epoch {epoch}: test loss {test['loss']:.4f}, accuracy {test['accuracy']:.4f}"
            )
        self.window.opened = time.perf_counter()  # evaluation is not training throughput

    def _save(self) -> None:
        """Checkpoint the state, unless an update made it non-finite: the last one stays good."""
        if not engine.all_finite(self.state.params):
            raise _NonFinite(f"the parameters after step {self.step} are not finite", self.step)
        self.checkpoints.save(self.state, self.rng, self.progress.meta(self.step))

    def _interrupted(self) -> Interrupted:
        return Interrupted(f"stopped by {self.stop.signal} at step {self.step}; checkpoint saved")
