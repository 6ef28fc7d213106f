"""`python -m cnnjax.report`: a synthetic multirun (the files a run writes), then a real one."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from cnnjax import report, sweep
from cnnjax.plots import figures

LR = "optimizer.learning_rate"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WIDTH, HEIGHT = (round(inches * figures.DPI) for inches in figures.FIGSIZE)
PNG_SHAPE = (HEIGHT, WIDTH, 4)  # RGBA, 480x640
DIVERGED = "Training diverged: the mean loss of steps 1-5 is nan. Lower the learning rate."


def write_job(job: Path, lr: str, seed: int, summary: dict | None) -> None:
    """A multirun job as train.py and Hydra leave it; `summary` None: crashed before writing one
    (only .hydra/ is there)."""
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"{LR}={lr}", f"trainer.seed={seed}", "trainer.epochs=2"]
    (job / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is None:
        return
    config = {"model": {"_target_": "cnnjax.models.mnist_allconv.MnistAllConv"}}
    (job / "config.yaml").write_text(yaml.safe_dump(config | {"trainer": {"seed": seed}}))
    summary = {"model": "mnist_allconv", "dataset": "toy", "run_dir": str(job)} | summary
    (job / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["status"] == "completed":
        acc = summary["test_accuracy"]
        lines = [
            {"step": 8, "epoch": 1.0, "split": "train", "loss": 1.2, "accuracy": 0.5,
             "learning_rate": float(lr), "images_per_s": None},
            {"step": 8, "epoch": 1.0, "split": "test", "loss": 0.6, "accuracy": acc - 0.05},
            {"step": 16, "epoch": 2.0, "split": "test", "loss": 0.4, "accuracy": acc},
        ]  # fmt: skip
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def completed(accuracy: float, wall: float) -> dict:
    return {
        "status": "completed", "params": 33_058, "steps": 16, "epochs": 2.0,
        "test_accuracy": accuracy, "test_loss": 0.4, "best_test_accuracy": accuracy,
        "train_wall_s": wall, "total_wall_s": wall + 1, "macs": 1_472_256,
        "receptive_field": [40, 40],
    }  # fmt: skip


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """2 learning rates x 2 seeds completed; lr 1.0: one diverged, one crashed without summary."""
    root = tmp_path / "multirun/2025-01-01/12-00-00"
    jobs = [
        ("0.001", 0, completed(0.90, 10.0)),
        ("0.001", 1, completed(0.92, 12.0)),
        ("0.003", 0, completed(0.85, 9.0)),
        ("0.003", 1, completed(0.88, 11.0)),
        ("1.0", 0, {"status": "diverged", "error": DIVERGED, "total_wall_s": 3.0}),
        ("1.0", 1, None),
    ]
    for num, (lr, seed, summary) in enumerate(jobs):
        write_job(root / str(num), lr, seed, summary)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_groups_pool_the_seeds_with_mean_and_sample_std(sweep_dir):
    runs = sweep.load_runs(sweep_dir)
    assert [r.run for r in runs] == ["0", "1", "2", "3", "4", "5"]
    assert [r.status for r in runs] == ["completed"] * 4 + ["diverged", "failed"]
    assert [r.seed for r in runs] == [0, 1, 0, 1, 0, None]  # the crashed job has no config.yaml
    assert runs[0].receptive_field == "40x40" and runs[0].curve == ((1.0, 0.85), (2.0, 0.9))
    assert sweep.varying_keys(runs) == [LR, "trainer.seed"]  # trainer.epochs is constant

    groups = sweep.group_runs(runs, [LR])
    assert [g.values for g in groups] == [{LR: "0.001"}, {LR: "0.003"}, {LR: "1.0"}]
    assert [(g.n, g.not_completed) for g in groups] == [(2, 0), (2, 0), (0, 2)]
    assert [g.mean for g in groups[:2]] == pytest.approx([0.91, 0.865])
    assert [g.std for g in groups[:2]] == pytest.approx([0.0141421356, 0.0212132034])  # ddof=1
    assert [g.train_wall_s for g in groups[:2]] == pytest.approx([11.0, 10.0])
    assert (groups[0].first("params"), groups[0].first("macs")) == (33_058, 1_472_256)
    assert [(e, round(a, 9)) for e, a in groups[0].curve()] == [(1.0, 0.86), (2.0, 0.91)]
    one = sweep.group_runs(runs[:1], [])[0]
    assert (one.n, one.mean, one.label) == (1, 0.9, "all runs") and one.std != one.std  # NaN


def test_report_tables_list_groups_and_every_run_that_did_not_complete(sweep_dir, tmp_path, capsys):
    out = tmp_path / "report"
    report.main([str(sweep_dir), "--out", str(out)])
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith(f"| {LR} | model | n | seeds | test accuracy (mean ± std) |")
    size = "33,058 | 1,472,256 | 40x40"  # params, MACs, receptive field
    assert rows[2:5] == [  # best mean first; the lr without a completed run last
        f"| 0.001 | mnist_allconv | 2 | 0, 1 | 0.9100 ± 0.0141 | 11.0 | {size} | 0 |",
        f"| 0.003 | mnist_allconv | 2 | 0, 1 | 0.8650 ± 0.0212 | 10.0 | {size} | 0 |",
        "| 1.0 |  | 0 |  |  |  |  |  |  | 2 |",
    ]
    assert rows[5] == f"| run | status | model | {LR} | seed | error |"
    assert rows[7:] == [
        f"| 4 | diverged | mnist_allconv | 1.0 | 0 | {DIVERGED} |",
        f"| 5 | failed |  | 1.0 |  | {sweep.NO_SUMMARY} |",
    ]
    with (out / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r[LR], r["seed"]) for r in table] == [
        ("0", "completed", "0.001", "0"), ("1", "completed", "0.001", "1"),
        ("2", "completed", "0.003", "0"), ("3", "completed", "0.003", "1"),
        ("4", "diverged", "1.0", "0"), ("5", "failed", "1.0", ""),
    ]  # fmt: skip
    assert table[0]["test_accuracy"] == "0.9" and table[0]["receptive_field"] == "40x40"
    assert table[4]["error"] == DIVERGED and "trainer.epochs=2" in table[4]["overrides"]
    assert "trainer.seed" not in table[0]  # the seed has its own column
    stdout = capsys.readouterr().out
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [
        "accuracy_vs_macs.png", "accuracy_vs_optimizer_learning_rate.png",
        "accuracy_vs_params.png", "learning_curves.png",
    ]  # fmt: skip
    for path in [out / "report.csv", out / "report.md", *pngs]:
        assert f"wrote {path}" in stdout
    for path in pngs:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(path).shape == PNG_SHAPE


def test_plots_without_data_are_skipped_and_said(tmp_path, capsys):
    write_job(tmp_path / "0", "1.0", 0, None)  # a lone crashed job: listed, nothing to plot
    report.main([str(tmp_path)])
    stdout = capsys.readouterr().out
    for name in ("accuracy_vs_params.png", "accuracy_vs_macs.png", "learning_curves.png"):
        assert f"skipped {name}: no completed run" in stdout
    assert not list(tmp_path.glob("*.png"))
    assert f"| 0 | failed |  |  | {sweep.NO_SUMMARY} |" in (tmp_path / "report.md").read_text()


def test_an_optuna_search_gets_its_trials_plot(sweep_dir, capsys):
    report.main([str(sweep_dir)])
    assert "trials.png" not in capsys.readouterr().out  # a grid sweep_dir: no trials plot
    (sweep_dir / sweep.OPTUNA_RESULTS).write_text("name: optuna\nbest_value: 0.92\n")
    report.main([str(sweep_dir)])
    assert f"wrote {sweep_dir / 'trials.png'}" in capsys.readouterr().out
    assert matplotlib.image.imread(sweep_dir / "trials.png").shape == PNG_SHAPE
    for job in range(4):  # the completed trials crash instead
        (sweep_dir / str(job) / "summary.json").unlink()
    report.main([str(sweep_dir)])
    assert "skipped trials.png: no trial completed" in capsys.readouterr().out


def test_a_single_run_dir_is_one_group(sweep_dir):
    runs = sweep.load_runs(sweep_dir / "0")
    assert [(r.run, r.test_accuracy) for r in runs] == [(".", 0.9)]
    assert sweep.varying_keys(runs) == []


def test_cli_exits_2_naming_the_problem(tmp_path, capsys):
    for target, problem in [(tmp_path / "nope", "does not exist"), (tmp_path, "no runs under")]:
        with pytest.raises(SystemExit) as exit_info:
            report.main([str(target)])
        assert exit_info.value.code == 2
        assert problem in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "cnnjax.report", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and f"no runs under {tmp_path}" in proc.stderr


def test_report_on_a_real_multirun(tmp_path, idx_dir, run_train, run_command):
    sweep_dir = tmp_path / "sweep_dir"
    run_train(
        idx_dir, f"{LR}=1e-3,3e-3", "trainer.max_steps=3", "trainer.compilation_cache_dir=null",
        f"hydra.sweep.dir={sweep_dir}", multirun=True,
    )  # fmt: skip
    proc = run_command("report", str(sweep_dir))
    assert proc.returncode == 0, proc.stderr
    with (sweep_dir / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r[LR], r["seed"]) for r in table] == [
        ("0", "completed", "0.001", "0"),  # Hydra writes 1e-3 as 0.001
        ("1", "completed", "0.003", "0"),
    ]
    assert {(r["params"], r["macs"], r["receptive_field"], r["steps"]) for r in table} == {
        ("33058", "1472256", "40x40", "3")
    }
    assert "None: every run completed." in (sweep_dir / "report.md").read_text()
    assert f"wrote {sweep_dir / 'accuracy_vs_optimizer_learning_rate.png'}" in proc.stdout
    assert f"wrote {sweep_dir / 'learning_curves.png'}" in proc.stdout


def test_a_swept_model_is_one_column_of_the_failed_runs(tmp_path):
    runs = [
        sweep.Run("0", "completed", "lenet", 0, 0.9, overrides={"model": "lenet"}),
        sweep.Run("1", "failed", "vgg11", 0, overrides={"model": "vgg11"}, error="boom"),
    ]
    md = report.markdown(tmp_path, runs, sweep.group_runs(runs, ["model"]), ["model"])
    assert "| run | status | model | seed | error |\n" in md
    assert "| 1 | failed | vgg11 | 0 | boom |" in md
