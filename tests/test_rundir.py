"""A run directory's files, written and read back in one place."""

import json

from omegaconf import OmegaConf

from cnnjax import rundir


def test_written_files_read_back(tmp_path):
    writer = rundir.RunWriter(tmp_path)
    writer.config(OmegaConf.create({"a": 1, "b": "${a}"}))
    for step in (5, 10, 15):
        writer.metrics(step=step, epoch=step / 10, split="train", loss=1.0 / step, accuracy=0.5)
    writer.summary(status="running", steps=0)
    writer.summary(status="completed", steps=15)
    writer.close()
    assert rundir.read_config(tmp_path) == {"a": 1, "b": 1}  # resolved
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [5, 10, 15]
    assert rundir.read_summary(tmp_path) == {"status": "completed", "steps": 15}
    assert not list(tmp_path.glob("*.tmp"))  # the summary is replaced atomically
    assert list(tmp_path.glob("events.out.tfevents.*"))  # TensorBoard


def test_a_resumed_run_drops_the_lines_past_its_checkpoint(tmp_path):
    writer = rundir.RunWriter(tmp_path)
    for step in (5, 10, 15):
        writer.metrics(step=step, epoch=0.0, split="train", loss=1.0, accuracy=0.5)
    writer.truncate_metrics(after_step=10)
    writer.close()
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [5, 10]


def test_readers_of_a_directory_without_the_files(tmp_path):
    assert rundir.read_config(tmp_path) is None and rundir.read_summary(tmp_path) is None
    assert rundir.read_metrics(tmp_path) == []
    (tmp_path / rundir.METRICS).write_text(json.dumps({"step": 1}) + '\n{"step": 2, "lo')
    assert rundir.read_metrics(tmp_path) == [{"step": 1}]  # a torn last line is skipped


def test_other_processes_write_nothing(tmp_path):
    writer = rundir.RunWriter(tmp_path, primary=False)
    writer.config(OmegaConf.create({"a": 1}))
    writer.metrics(step=1, epoch=0.0, split="train", loss=1.0, accuracy=0.5)
    writer.summary(status="running")
    writer.close()
    assert list(tmp_path.iterdir()) == []
