"""End to end: the CLI on a small generated IDX dataset, sweeps, determinism and divergence."""

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import cli, read_jsonl

from cnnjax import runtime, train

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


@pytest.fixture
def jax_cache(tmp_path, monkeypatch, caches) -> Iterator[Path]:
    """An empty compilation cache of the test's own (the session's again afterwards)."""
    path = tmp_path / "jax_cache"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(path))  # the config's default
    yield path
    runtime.use_compilation_cache(str(caches / "jax"))


def test_cli_run_writes_config_metrics_and_summary(tmp_path, idx_dir, run_train):
    run_dir = tmp_path / "run"
    args = ("trainer.max_steps=12", "trainer.log_every=4", f"hydra.run.dir={run_dir}")
    proc = run_train(idx_dir, *args)
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
    overrides = [
        "model=mnist_allconv",
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
        summary = train.run(cfg, tmp_path / name, "mnist_allconv")
        results.append(
            (
                summary["test_accuracy"],
                summary["test_loss"],
                [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")],
            )
        )
    assert results[0] == results[1]
    assert results[0][0] >= 0.9  # the toy classes are separable


def test_multirun_gives_each_job_its_directory(tmp_path, idx_dir, run_train):
    sweep = tmp_path / "sweep"
    run_train(
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


def test_visualize_at_the_end_of_training(tmp_path, idx_dir, run_train):
    run_dir = tmp_path / "run"
    run_train(
        idx_dir,
        "trainer.max_steps=3",
        "trainer.visualize=true",
        f"hydra.run.dir={run_dir}",
    )
    pictures = {p.name for p in (run_dir / "visualize").glob("*.png")}
    assert pictures == {"kernels.png", "receptive_field.png", "curves.png", "confusion.png"}
    assert len(list((run_dir / "visualize" / "feature_maps").glob("*.png"))) == 7  # 7 convs


def test_a_failing_job_does_not_stop_the_sweep(tmp_path, idx_dir, run_train):
    sweep = tmp_path / "sweep"
    proc = run_train(
        idx_dir,
        "trainer.batch_size=1000000,32",  # job 0 cannot make one batch
        "trainer.max_steps=3",
        f"hydra.sweep.dir={sweep}",
        multirun=True,
    )
    failed, completed = (json.loads((sweep / f"{j}/summary.json").read_text()) for j in (0, 1))
    assert failed["status"] == "failed" and "exceeds the" in failed["error"]
    assert completed["status"] == "completed"
    assert "job 0 failed; the sweep goes on" in proc.stderr + proc.stdout


def test_optuna_search_of_two_trials(tmp_path, idx_dir, run_train):
    sweep = tmp_path / "optuna"
    run_train(
        idx_dir,
        "hparams_search=learning_rate",
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=3",
        f"hydra.sweep.dir={sweep}",
        multirun=True,
    )
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert [t["status"] for t in trials] == ["completed", "completed"]
    rates = [yaml.safe_load((sweep / f"{j}/.hydra/overrides.yaml").read_text()) for j in (0, 1)]
    assert all(any(o.startswith("optimizer.learning_rate=") for o in r) for r in rates)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t["test_accuracy"] for t in trials)


def test_divergence_stops_with_status_and_advice(tmp_path, idx_dir, run_train):
    run_dir = tmp_path / "run"
    proc = run_train(
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


def test_bad_geometry_fails_before_compiling_by_layer_name(tmp_path, idx_dir, run_train):
    run_dir = tmp_path / "run"
    proc = run_train(
        idx_dir, "model=alexnet", "model.input_size=28", f"hydra.run.dir={run_dir}", check=False
    )
    assert proc.returncode != 0
    assert "'pool2'" in proc.stderr and "67x67" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "GeometryError" in summary["error"]


def test_a_model_whose_receptive_field_is_unknown_trains_and_says_so(tmp_path, idx_dir, run_train):
    run_dir = tmp_path / "run"
    proc = run_train(idx_dir, "model._target_=helpers.RunningSum", "trainer.max_steps=2",
                     f"hydra.run.dir={run_dir}")  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["receptive_field"] is None
    assert "final receptive field unknown" in proc.stderr + proc.stdout
    assert "receptive field unknown from `cumsum` in 'RunningSum'" in proc.stderr + proc.stdout


def test_a_second_process_loads_the_compilations_of_the_first(tmp_path, idx_dir, jax_cache):
    runs = [tmp_path / "first", tmp_path / "second"]  # both fresh processes: no memory cache
    cli(idx_dir, "trainer.max_steps=2", f"hydra.run.dir={runs[0]}")
    entries = {p.name for p in jax_cache.iterdir()}
    assert any(name.startswith("jit_train_step-") for name in entries)
    cli(idx_dir, "trainer.max_steps=2", f"hydra.run.dir={runs[1]}")
    assert {p.name for p in jax_cache.iterdir()} == entries  # every compilation was a cache hit
    summary = json.loads((runs[1] / "summary.json").read_text())
    assert summary["compilation_cache_dir"] == str(jax_cache) and summary["compile_s"] is not None


def test_target_accuracy_ends_the_run_early(tmp_path, idx_dir, compose_cfg, monkeypatch):
    recipe = [
        f"dataset.source_dir={idx_dir}",
        "dataset.name=toy",
        "schedule=constant",
        "trainer.epochs=3",  # 24 steps
        "trainer.progress=false",
        "trainer.eval_batch_size=100",
    ]
    run_dir, name = tmp_path / "run", "mnist_allconv"
    summary = train.run(compose_cfg(*recipe, "trainer.target_accuracy=0.5"), run_dir, name)
    assert summary["status"] == "completed" and summary["reached_target"] is True
    assert summary["target_step"] == summary["steps"] < 24 and summary["steps"] % 8 == 0
    assert summary["target_epoch"] == summary["epochs"] and summary["target_train_wall_s"] > 0
    tests = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "test"]
    assert [r["accuracy"] >= 0.5 for r in tests] == [False] * (len(tests) - 1) + [True]
    assert tests[-1]["accuracy"] == summary["test_accuracy"]

    # the same command again resumes at the target and trains no further
    again = train.run(compose_cfg(*recipe, "trainer.target_accuracy=0.5"), run_dir, name)
    assert {k: again[k] for k in ("status", "steps", "reached_target", "target_step")} == {
        k: summary[k] for k in ("status", "steps", "reached_target", "target_step")
    }
    # no target now: it trains on from there to the last step
    more = train.run(compose_cfg(*recipe, "trainer.target_accuracy=null"), run_dir, name)
    assert more["steps"] == 24 and "reached_target" not in more
