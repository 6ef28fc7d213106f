"""A run directory's files, written and read back in one place."""

import json
import os

import pytest
from omegaconf import OmegaConf

from cnnjax import rundir
from cnnjax.errors import RunDirError


def test_nothing_is_written_before_the_run_begins(tmp_path):
    writer = rundir.RunWriter(tmp_path)
    assert not writer.begun and list(tmp_path.iterdir()) == []
    writer.begin(OmegaConf.create({"a": 1}), {"status": "running"}, step=0)
    assert writer.begun and rundir.read_summary(tmp_path) == {"status": "running"}
    writer.close()


def test_written_files_read_back(tmp_path):
    writer = rundir.RunWriter(tmp_path)
    writer.begin(OmegaConf.create({"a": 1, "b": "${a}"}), {"status": "running", "steps": 0}, 0)
    for step in (5, 10, 15):
        writer.metrics(step=step, epoch=step / 10, split="train", loss=1.0 / step, accuracy=0.5)
    writer.summary(status="completed", steps=15)
    writer.close()
    assert rundir.read_config(tmp_path) == {"a": 1, "b": 1}  # resolved
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [5, 10, 15]
    assert rundir.read_summary(tmp_path) == {"status": "completed", "steps": 15}
    assert not list(tmp_path.glob("*.tmp"))  # the summary is replaced atomically
    assert list(tmp_path.glob("events.out.tfevents.*"))  # TensorBoard


def test_a_resumed_run_drops_the_lines_past_its_checkpoint_and_torn_ones(tmp_path, caplog):
    writer = rundir.RunWriter(tmp_path)
    for step in (5, 10, 15):
        writer.metrics(step=step, epoch=0.0, split="train", loss=1.0, accuracy=0.5)
    with writer.metrics_path.open("a") as f:
        f.write('{"step": 20, "ep')
    writer.begin(OmegaConf.create({}), {"status": "running"}, step=10)
    writer.close()
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [5, 10]
    assert "dropped 1 torn line(s)" in caplog.text


def test_readers_of_a_directory_without_the_files(tmp_path):
    assert rundir.read_config(tmp_path) is None and rundir.read_summary(tmp_path) is None
    assert rundir.read_metrics(tmp_path) == []
    (tmp_path / rundir.METRICS).write_text(json.dumps({"step": 1}) + '\n{"step": 2, "lo')
    assert rundir.read_metrics(tmp_path) == [{"step": 1}]  # a torn last line is skipped


def test_other_processes_write_nothing(tmp_path):
    writer = rundir.RunWriter(tmp_path, primary=False)
    writer.begin(OmegaConf.create({"a": 1}), {"status": "running"}, step=0)
    writer.metrics(step=1, epoch=0.0, split="train", loss=1.0, accuracy=0.5)
    writer.summary(status="running")
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_one_process_at_a_time(tmp_path):
    with rundir.Lock(tmp_path):
        holder = (tmp_path / rundir.LOCK).read_text()
        assert holder.startswith(f"process {os.getpid()} on ")
        with pytest.raises(RunDirError, match=f"is in use by process {os.getpid()} on "):
            rundir.Lock(tmp_path).__enter__()
    assert (tmp_path / rundir.LOCK).read_text() == ""  # released
    with rundir.Lock(tmp_path):  # free again
        pass


def test_what_makes_a_directory_hold_a_run(tmp_path):
    assert not rundir.holds_run(tmp_path)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / rundir.LOCK).write_text("")
    (tmp_path / "checkpoints").mkdir()
    assert not rundir.holds_run(tmp_path)  # Hydra's files, a lock, no checkpoint
    (tmp_path / rundir.METRICS).write_text("")
    assert rundir.holds_run(tmp_path)
