"""End to end: the CLI on a small generated IDX dataset, sweeps, determinism and divergence."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cnnjax import train

SUMMARY_KEYS = {
    "status",
    "model",
    "dataset",
    "params",
    "steps",
    "epochs",
    "test_accuracy",
    "test_loss",
    "train_wall_s",
    "total_wall_s",
}


def cli(tmp_path: Path, idx_dir: Path, *overrides: str, multirun=False, check=True):
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
    args = [
        sys.executable,
        "-m",
        "cnnjax.train",
        *(["-m"] if multirun else []),
        f"dataset.source_dir={idx_dir}",
        "dataset.name=toy",
        "trainer.progress=false",
        "trainer.eval_batch_size=100",
        *overrides,
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_run_writes_config_metrics_and_summary(tmp_path, idx_dir):
    run_dir = tmp_path / "run"
    proc = cli(
        tmp_path, idx_dir, "trainer.max_steps=12", "trainer.log_every=4", f"hydra.run.dir={run_dir}"
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["status"] == "completed"
    assert (summary["model"], summary["params"], summary["steps"]) == ("mnist_allconv", 33_058, 12)
    assert (summary["macs"], summary["receptive_field"]) == (1_472_256, [40, 40])  # analysis
    assert summary["epochs"] == pytest.approx(12 / 8)  # 1,024 examples / batch 128 = 8 per epoch
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert [r["step"] for r in train_rows] == [4, 8, 12]  # step 1 compiles and is timed apart
    assert all(r["images_per_s"] > 0 and 0 <= r["accuracy"] <= 1 for r in train_rows)
    assert [r["step"] for r in test_rows] == [8, 12]  # after epoch 1 and at the end
    assert test_rows[-1]["accuracy"] == summary["test_accuracy"]
    assert {"step", "epoch", "split", "loss", "accuracy"} <= set(test_rows[0])
    config = (run_dir / "config.yaml").read_text()
    assert "${" not in config and str(idx_dir) in config  # resolved
    assert "test accuracy" in proc.stdout  # the final line, logged
    scalars = read_events(run_dir)
    assert [step for step, tag, _ in scalars if tag == "train/loss"] == [4, 8, 12]
    assert {"train/accuracy", "train/learning_rate", "train/images_per_s", "test/accuracy"} <= {
        tag for _, tag, _ in scalars
    }
    assert (12, "test/accuracy", pytest.approx(summary["test_accuracy"])) in scalars


def read_events(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of the TensorBoard scalars in `run_dir`, read with the bare protobufs."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
            i += 12 + n + 4
    return out


def test_same_seed_same_result_and_it_learns(tmp_path, idx_dir, compose_cfg, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    overrides = [
        "model=blocknet",
        f"dataset.source_dir={idx_dir}",
        "dataset.name=toy",
        "schedule=constant",
        "trainer.epochs=4",
        "trainer.progress=false",
        "trainer.log_every=4",
    ]
    results = []
    for name in ("a", "b"):
        cfg = compose_cfg(*overrides)
        summary = train.run(cfg, tmp_path / name)
        results.append(
            (
                summary["test_accuracy"],
                summary["test_loss"],
                [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")],
            )
        )
    assert results[0] == results[1]
    assert results[0][0] >= 0.9  # the toy classes are separable


def test_multirun_gives_each_job_its_directory(tmp_path, idx_dir):
    sweep = tmp_path / "sweep"
    cli(
        tmp_path,
        idx_dir,
        "model=mnist_allconv,lenet",
        "trainer.max_steps=3",
        f"hydra.sweep.dir={sweep}",
        multirun=True,
    )
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    by_model = {s["model"]: s for s in (json.loads(p.read_text()) for p in summaries)}
    assert by_model["lenet"]["params"] == 81_194
    assert "resize 28x28 -> 32x32" in by_model["lenet"]["input_adaptation"]
    assert all(s["status"] == "completed" for s in by_model.values())


def test_divergence_stops_with_status_and_advice(tmp_path, idx_dir):
    run_dir = tmp_path / "run"
    proc = cli(
        tmp_path,
        idx_dir,
        "optimizer=sgd",
        "optimizer.learning_rate=1e8",
        "schedule=constant",
        "trainer.max_steps=40",
        "trainer.log_every=5",
        f"hydra.run.dir={run_dir}",
        check=False,
    )
    assert proc.returncode != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert "learning rate" in summary["error"] and "1e8" in summary["error"].replace(
        "100000000.0", "1e8"
    )


def test_bad_geometry_fails_before_compiling_by_layer_name(tmp_path, idx_dir):
    run_dir = tmp_path / "run"
    proc = cli(
        tmp_path, idx_dir, "model=alexnet", "model.input_size=28", f"hydra.run.dir={run_dir}",
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "'pool2'" in proc.stderr and "67x67" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "GeometryError" in summary["error"]
