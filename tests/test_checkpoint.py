"""Runs that survive: SIGKILL + resume ends exactly as an uninterrupted run, SIGTERM checkpoints
and stops cleanly, divergence keeps a good checkpoint, a damaged checkpoint is skipped."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import checkpoint_steps, final_arrays, read_jsonl, train_here

ARGS = (
    "trainer.max_steps=120",
    "trainer.log_every=5",
    "trainer.checkpoint_every=10",
    "trainer.keep_checkpoints=3",
)


def _same_run(a: Path, b: Path) -> None:
    leaves_a, leaves_b = jax.tree.leaves(final_arrays(a)), jax.tree.leaves(final_arrays(b))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["status"] == sb["status"] == "completed"
    for key in ("steps", "test_accuracy", "test_loss", "best_test_accuracy", "best_epoch"):
        assert sa[key] == sb[key], key
    drop = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert drop(read_jsonl(a / "metrics.jsonl")) == drop(read_jsonl(b / "metrics.jsonl"))


def _start(idx_dir: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "cnnjax.train", f"dataset.source_dir={idx_dir}", "dataset.name=toy",
        "trainer.progress=false", "trainer.eval_batch_size=100", *ARGS, *extra,
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    pipe = subprocess.PIPE
    return subprocess.Popen(args, stdout=pipe, stderr=pipe, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, at_least: int) -> None:
    deadline = time.monotonic() + 300
    while not any(s >= at_least for s in checkpoint_steps(run_dir)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, idx_dir) -> Path:
    """An uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    assert train_here(idx_dir, *ARGS, f"hydra.run.dir={tmp / 'run'}") == 0
    return tmp / "run"


def test_sigkill_then_resume_ends_exactly_as_an_uninterrupted_run(
    tmp_path, idx_dir, reference, run_train
):
    run_dir = tmp_path / "run"
    proc = _start(idx_dir, run_dir)
    _wait_for_checkpoint(proc, run_dir, at_least=30)
    proc.send_signal(signal.SIGKILL)  # no handler, no clean-up: mid-step or mid-save
    proc.wait(timeout=60)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"
    killed_at = checkpoint_steps(run_dir)[-1]
    assert killed_at < 120
    done = run_train(idx_dir, *ARGS, f"hydra.run.dir={run_dir}")  # the same command again
    assert f"resuming from the checkpoint at step {killed_at}" in done.stdout + done.stderr
    _same_run(reference, run_dir)


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tmp_path, idx_dir, reference, run_train):
    run_dir = tmp_path / "run"
    proc = _start(idx_dir, run_dir)
    _wait_for_checkpoint(proc, run_dir, at_least=20)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert f"at step {checkpoint_steps(run_dir)[-1]}; checkpoint saved" in summary["error"]
    run_train(idx_dir, *ARGS, f"hydra.run.dir={run_dir}")
    _same_run(reference, run_dir)


def test_a_damaged_checkpoint_is_reported_and_the_previous_used(
    tmp_path, idx_dir, reference, run_train
):
    run_dir = tmp_path / "run"
    run_train(idx_dir, *ARGS[1:], "trainer.max_steps=100", f"hydra.run.dir={run_dir}")
    last = checkpoint_steps(run_dir)[-1]
    for f in (run_dir / "checkpoints" / str(last) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")  # truncated
    done = run_train(idx_dir, *ARGS, f"hydra.run.dir={run_dir}")
    log = done.stdout + done.stderr
    assert f"checkpoint {last} in" in log and "cannot be read" in log
    _same_run(reference, run_dir)


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, idx_dir, run_train):
    run_dir = tmp_path / "run"
    proc = run_train(
        idx_dir, "optimizer=sgd", "optimizer.learning_rate=50", "schedule=constant",
        "trainer.max_steps=200", "trainer.log_every=1", "trainer.checkpoint_every=1",
        f"hydra.run.dir={run_dir}", check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    good = checkpoint_steps(run_dir)
    assert good and f"last good checkpoint is step {good[-1]}" in summary["error"]
    arrays = final_arrays(run_dir)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(arrays["params"]))
