"""Bad input and faults, tried as a user would. Each case checks the exit status, the message
(one paragraph, no traceback) and that what existed before is intact: a finished run's files,
prepared data. The commands run in this process (their `main`, as the CLI calls it) except where
a second process or the traceback switch is the point."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import CONF_DIR, command, final_arrays, make_idx_dataset, read_jsonl, write_idx

from cnnjax import checkpoint, data, rundir

TOY = (
    "dataset.name=toy", "trainer.progress=false", "trainer.eval_batch_size=100",
    "trainer.max_steps=8", "trainer.log_every=2", "trainer.checkpoint_every=4",
)  # fmt: skip
KEPT = ("config.yaml", "summary.json", "metrics.jsonl", "checkpoints")  # what a run leaves


@pytest.fixture
def tfds_dir() -> Path:
    """Where the session prepares datasets (conftest's `caches`)."""
    return Path(os.environ["TFDS_DATA_DIR"])


def _train_args(run_dir: Path, idx_dir: Path, *overrides: str) -> tuple[str, ...]:
    return (f"dataset.source_dir={idx_dir}", *TOY, *overrides, f"hydra.run.dir={run_dir}")


class Cli:
    """The commands, run in this process (conftest's `run_command`): `cli(name, *args)` gives
    (exit status, stderr); `cli.out` holds what the last one printed and logged."""

    def __init__(self, run_command):
        self.run_command, self.out = run_command, ""

    def __call__(self, name: str, *args: str) -> tuple[int, str]:
        proc = self.run_command(name, *args)
        self.out = proc.stdout
        return proc.returncode, proc.stderr

    def train(self, run_dir: Path, idx_dir: Path, *overrides: str) -> tuple[int, str]:
        """`python -m cnnjax.train` on the toy data in `run_dir`."""
        return self("train", *_train_args(run_dir, idx_dir, *overrides))

    def refused(self, run_dir: Path, idx_dir: Path, overrides: list[str], *message: str) -> None:
        """Training in `run_dir` with `overrides` is refused (see `refused`) and leaves every
        file of the run there as it was."""
        before = files(run_dir)
        refused(*self.train(run_dir, idx_dir, *overrides), *message)
        assert files(run_dir) == before


@pytest.fixture
def cli(run_command) -> Cli:
    return Cli(run_command)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, idx_dir) -> Path:
    """A completed 8-step run (checkpoints at steps 4 and 8)."""
    run_dir = tmp_path_factory.mktemp("bad_inputs") / "finished"
    assert command("train", *_train_args(run_dir, idx_dir)) == 0
    return run_dir


@pytest.fixture
def done(finished, tmp_path) -> Path:
    """A copy of the finished run, for one test to rerun in."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def files(run_dir: Path) -> dict[str, bytes]:
    """Every file a run leaves (not Hydra's .hydra/ and log, nor the lock), by relative path."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.relative_to(run_dir).parts[0] in (*KEPT, *_events(run_dir))
    }


def _events(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.glob("events.out.tfevents.*")]


def refused(code: int, err: str, *message: str) -> None:
    """Exit status 2 and one paragraph holding every `message` fragment."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in message:
        assert fragment in err, (fragment, err)


# ---------------------------------------------------------------- settings


BAD_VALUES = [
    ("trainer.batch_size=abc", "trainer.batch_size='abc' must be a whole number of at least 1"),
    ("trainer.batch_size=0", "trainer.batch_size=0 must be a whole number of at least 1"),
    ("trainer.batch_size=-5", "trainer.batch_size=-5 must be"),
    ("trainer.batch_size=1.5", "trainer.batch_size=1.5 must be"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size=0 must be"),
    ("trainer.log_every=0", "trainer.log_every=0 must be a whole number of steps"),
    ("trainer.checkpoint_every=0", "trainer.checkpoint_every=0 must be"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints=0 must be"),
    ("trainer.eval_every=0", "trainer.eval_every=0 must be"),
    ("trainer.seed=abc", "trainer.seed='abc' must be a whole number of at least 0"),
    ("trainer.seed=-1", "trainer.seed=-1 must be"),
    ("trainer.epochs=0", "trainer.epochs=0 must be a whole number of at least 1"),
    ("trainer.epochs=-1", "trainer.epochs=-1 must be"),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be null (train trainer.epochs) or"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5 must be"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate=-1 must be a finite number above 0"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate=0 must be"),
    ("optimizer.learning_rate=nan", "optimizer.learning_rate=nan must be"),
    ("optimizer.learning_rate=inf", "optimizer.learning_rate=inf must be"),
    ("optimizer.learning_rate=fast", "optimizer.learning_rate='fast' must be"),
    ("dataset.std=[0]", "dataset.std=[0] must be null (the training images' own) or a list of"),
    ("dataset.std=[0.3,0.3]", "dataset.std has 2 values for 1 channels"),
    ("dataset.num_classes=1", "dataset.num_classes=1 must be a whole number of at least 2"),
    ("trainer.precision=fp16", "trainer.precision='fp16' must be fp32 or bf16"),
    ("trainer.label_smoothing=1.5", "trainer.label_smoothing=1.5 must be a number in [0, 1]"),
    ("trainer.progress=maybe", "trainer.progress='maybe' must be true or false"),
    ("trainer.target_accuracy=2", "trainer.target_accuracy=2 must be null or a number in (0, 1]"),
    ("trainer.conv_backend=mkl", "trainer.conv_backend='mkl' must be auto, onednn or xla"),
    ("trainer.grad_clip_norm=0", "trainer.grad_clip_norm=0 must be null or a number above 0"),
    ("distributed.devices=-1", "distributed.devices=-1 must be all, per_job or a device number"),
    ("optimizer=sgd optimizer.momentum=2", "optimizer.momentum=2 must be null or a number in"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_value_is_refused_before_anything_is_written(done, idx_dir, override, message, cli):
    cli.refused(done, idx_dir, override.split(), message, "nothing was written")


def test_every_bad_value_is_named_at_once(done, idx_dir, cli):
    code, err = cli.train(done, idx_dir, "trainer.epochs=-1", "optimizer.learning_rate=-1")
    refused(code, err, "2 bad values", "trainer.epochs=-1", "optimizer.learning_rate=-1")


def test_a_batch_larger_than_the_data_names_the_size(done, idx_dir, cli):
    overrides = ["trainer.batch_size=5000"]
    cli.refused(done, idx_dir, overrides, "trainer.batch_size=5000 exceeds the 1024 training")


# ---------------------------------------------------------------- data


def test_labels_above_num_classes_name_the_largest(done, idx_dir, cli):
    cli.refused(
        done, idx_dir, ["dataset.num_classes=5"], "labels go up to 9", "dataset.num_classes=5",
        "dataset.num_classes=10",
    )  # fmt: skip


def test_an_image_size_other_than_the_files_is_named(done, idx_dir, cli):
    code, err = cli.train(done, idx_dir, "dataset.image_size=32")
    refused(code, err, "images are 28x28x1", "dataset.image_size=32")


def test_a_missing_source_names_the_files_and_the_fixes(done, idx_dir, tmp_path, cli):
    code, err = cli.train(done, idx_dir, f"dataset.source_dir={tmp_path / 'nowhere'}")
    refused(code, err, "the IDX files are not in", "train-images-idx3-ubyte[.gz]")


def test_a_cut_gzip_file_is_named_as_damaged(done, idx_dir, tmp_path, cli):
    source = tmp_path / "cut"
    shutil.copytree(idx_dir, source)
    path = source / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    overrides = [f"dataset.source_dir={source}"]
    cli.refused(done, idx_dir, overrides, f"{path} cannot be read", "damaged")


def test_a_file_that_is_not_idx_is_named(done, tmp_path, idx_dir, cli):
    source = tmp_path / "foreign"
    shutil.copytree(idx_dir, source)
    (source / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really")
    code, err = cli.train(done, idx_dir, f"dataset.source_dir={source}")
    refused(code, err, "t10k-labels-idx1-ubyte.gz")


def test_another_source_under_the_same_name_is_prepared_anew(
    tfds_dir, done, idx_dir, tmp_path, cli
):
    """Other IDX files under dataset.name=toy: prepared beside the first (not read from it),
    and a rerun of a run trained on the first is refused."""
    other = tmp_path / "other"
    arrays = make_idx_dataset(other, 512, 128, seed=7)
    prepared = sorted((tfds_dir / "idx_images").glob("toy_*"))
    loaded = data.load("toy", str(tfds_dir), str(other))
    np.testing.assert_array_equal(loaded.train.labels_N, arrays["train"][1])
    assert len(sorted((tfds_dir / "idx_images").glob("toy_*"))) == len(prepared) + 1
    assert loaded.source == f"idx sha256:{data.idx_digest(other)}"
    overrides = [f"dataset.source_dir={other}"]
    cli.refused(done, idx_dir, overrides, "holds another run: dataset.source: 'idx sha256:")


@contextlib.contextmanager
def read_only(root: Path) -> Iterator[None]:
    """`root` and everything under it unwritable, for root too (chattr +i: immutable)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "+i", str(root)], check=True)
    else:
        for path in (root, *root.rglob("*")):
            path.chmod(path.stat().st_mode & ~0o222)
    try:
        with pytest.raises(OSError):  # the protection holds
            (root / "probe").write_text("")
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-R", "-i", str(root)], check=True)
        else:
            for path in (root, *root.rglob("*")):
                path.chmod(path.stat().st_mode | 0o200)


def test_a_prepared_dataset_is_read_from_a_directory_it_cannot_write(idx_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    first = data.load("toy", str(data_dir), str(idx_dir))
    with read_only(data_dir):
        again = data.load("toy", str(data_dir), str(idx_dir))
    np.testing.assert_array_equal(again.train.images_NxHxWxC, first.train.images_NxHxWxC)


def test_an_unprepared_dataset_where_nothing_can_be_written_says_so(idx_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(data.DataError, match="cannot be prepared there .* writable directory"):
        data.load("toy", str(blocker / "tfds"), str(idx_dir))


# ---------------------------------------------------------------- the run directory


def test_resume_false_in_a_finished_run_leaves_it_as_it_was(done, idx_dir, cli):
    cli.refused(
        done, idx_dir, ["trainer.resume=false"], "already holds checkpoints (steps [4, 8])",
        "trainer.resume=true",
    )  # fmt: skip


def test_another_model_in_a_run_directory_is_refused(done, idx_dir, cli):
    cli.refused(
        done, idx_dir, ["model=lenet"], "holds another run",
        "model._target_: 'cnnjax.models.lenet.LeNet' here, "
        "'cnnjax.models.mnist_allconv.MnistAllConv' there",
        "give this run another hydra.run.dir",
    )  # fmt: skip


@pytest.mark.parametrize(
    "override, difference",
    [
        ("trainer.batch_size=64", "trainer.batch_size: 64 here, 128 there"),
        ("trainer.seed=1", "trainer.seed: 1 here, 0 there"),
        ("optimizer=sgd", "optimizer._target_: 'optax.sgd' here, 'optax.adam' there"),
        ("schedule=constant", "schedule._target_: 'cnnjax.schedules.constant' here"),
        ("trainer.precision=bf16", "trainer.precision: 'bf16' here, 'fp32' there"),
        ("dataset.augment.flip=true", "dataset.augment.flip: True here, False there"),
    ],
)
def test_a_rerun_that_changes_the_run_lists_what_differs(done, idx_dir, override, difference, cli):
    cli.refused(done, idx_dir, [override], "holds another run", difference)


def test_asking_for_fewer_steps_than_trained_is_refused(done, idx_dir, cli):
    overrides = ["trainer.max_steps=6"]
    cli.refused(done, idx_dir, overrides, "has trained 8 steps, more than the 6 this run asks")


def test_a_finished_run_can_be_extended(done, idx_dir, cli):
    code, err = cli.train(done, idx_dir, "trainer.max_steps=12")
    assert code == 0, err
    assert "resuming from the checkpoint at step 8" in cli.out
    summary = rundir.read_summary(done)
    assert (summary["status"], summary["steps"]) == ("completed", 12)
    steps = [r["step"] for r in rundir.read_metrics(done) if r["split"] == "train"]
    assert steps == [2, 4, 6, 8, 10, 12]  # the first run's lines, then the extension's


def test_the_same_command_again_changes_nothing_but_the_summary_times(done, idx_dir, cli):
    before = files(done)
    code, err = cli.train(done, idx_dir)
    assert code == 0, err
    after = files(done)  # (TensorBoard adds an events file of its own)
    assert {k: after[k] for k in before if k != "summary.json"} == {
        k: v for k, v in before.items() if k != "summary.json"
    }
    timing = {"total_wall_s", "train_wall_s", "compile_s", "images_per_s", "run_dir"}
    old, new = (json.loads(f["summary.json"]) for f in (before, after))
    assert {k: v for k, v in new.items() if k not in timing} == {
        k: v for k, v in old.items() if k not in timing
    }


def test_a_second_process_in_the_run_directory_stops_naming_the_holder(done, idx_dir):
    """This process holds the directory (as a training run does); a second one stops at once."""
    before = files(done)
    with rundir.Lock(done):
        args = [f"dataset.source_dir={idx_dir}", *TOY, f"hydra.run.dir={done}"]
        proc = subprocess.run(
            [sys.executable, "-m", "cnnjax.train", *args], capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
    refused(proc.returncode, proc.stderr, f"is in use by process {os.getpid()}", "Wait for it")
    assert files(done) == before


def test_a_lock_left_by_a_killed_process_is_taken_over(done, idx_dir, cli):
    (done / rundir.LOCK).write_text("process 999999 on elsewhere since 2026-01-01T00:00:00 (x)")
    code, err = cli.train(done, idx_dir)
    assert code == 0, err
    assert "took over the lock of process 999999 on elsewhere" in cli.out
    assert (done / rundir.LOCK).read_text() == ""  # released


def test_a_kill_before_the_first_checkpoint_leaves_no_duplicate_lines(done, finished, idx_dir, cli):
    """What such a kill leaves: the config, a "running" summary, metrics lines, no checkpoint.
    The rerun starts over and its metrics are the uninterrupted run's, once each."""
    shutil.rmtree(done / "checkpoints")
    summary = rundir.read_summary(done) | {"status": "running"}
    (done / rundir.SUMMARY).write_text(json.dumps(summary))
    code, err = cli.train(done, idx_dir)
    assert code == 0, err
    drop = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert drop(read_jsonl(done / rundir.METRICS)) == drop(read_jsonl(finished / rundir.METRICS))


def test_a_damaged_final_checkpoint_is_trained_again_and_rewritten(done, finished, idx_dir, cli):
    for f in (done / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    code, err = cli.train(done, idx_dir)
    assert code == 0, err
    assert "checkpoint 8 in" in cli.out  # reported, then step 4 resumed
    leaves = [jax.tree.leaves(final_arrays(d)) for d in (done, finished)]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit
    reopened = checkpoint.Checkpoints(done / "checkpoints", 3)
    assert reopened.recorded_run() is not None and reopened.steps() == [4, 8]
    reopened.close()


def test_a_torn_metrics_line_is_repaired_with_a_warning(done, finished, idx_dir, cli):
    with (done / rundir.METRICS).open("a") as f:
        f.write('{"step": 9, "epoch": 1.1, "spl')  # killed mid-write
    assert len(rundir.read_metrics(done)) == len(rundir.read_metrics(finished))  # readers skip it
    code, err = cli.train(done, idx_dir)
    assert code == 0, err
    assert "dropped 1 torn line(s)" in cli.out
    assert read_jsonl(done / rundir.METRICS) == read_jsonl(finished / rundir.METRICS)


def test_a_first_attempt_that_fails_records_why(idx_dir, tmp_path, cli):
    """A new directory keeps a record of the failed attempt (a sweep's report lists it)."""
    run_dir = tmp_path / "new"
    code, err = cli.train(run_dir, idx_dir, "dataset.num_classes=5")
    refused(code, err, "labels go up to 9")
    summary = rundir.read_summary(run_dir)
    assert summary["status"] == "failed" and "DataError" in summary["error"]
    assert (run_dir / rundir.CONFIG).is_file() and not _events(run_dir)


def test_divergence_in_the_first_steps_names_the_data_too(idx_dir, tmp_path, cli):
    run_dir = tmp_path / "nan"
    code, err = cli.train(
        run_dir, idx_dir, "optimizer=sgd", "optimizer.learning_rate=1e8", "schedule=constant",
        "trainer.log_every=1", "dataset.std=[1e-6]",
    )  # fmt: skip
    refused(
        code, err, "Training diverged: the mean loss of steps",
        "the labels take 10 values, 0-9, for dataset.num_classes=10",
        "SUSPECT: set them to the training images' mean and std",
        "learning rate (100000000.0)",
    )  # fmt: skip
    assert rundir.read_summary(run_dir)["status"] == "diverged"


def test_a_traceback_on_request(done, idx_dir):
    args = [f"dataset.source_dir={idx_dir}", *TOY, "trainer.batch_size=0", f"hydra.run.dir={done}"]
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    proc = subprocess.run(
        [sys.executable, "-m", "cnnjax.train", *args], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


# ---------------------------------------------------------------- readers and other commands


def test_visualize_on_damaged_checkpoints_says_which_and_why(done, cli):
    for f in (done / "checkpoints").rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"")
    code, err = cli("visualize", f"run_dir={done}")
    refused(code, err, "none of the checkpoints in", "step 4:", "step 8:", "hydra.run.dir")


def test_visualize_falls_back_past_a_damaged_checkpoint_with_one_warning(done, cli):
    for f in (done / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    code, err = cli("visualize", f"run_dir={done}", "images=1", "channels=1")
    assert code == 0, err
    out = cli.out.splitlines()
    warnings = [line for line in out if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint 8 cannot be read" in warnings[0]
    assert "pictures are of step 4" in warnings[0] and "Traceback" not in "\n".join(out)


def test_visualize_on_a_config_it_cannot_parse(done, cli):
    (done / rundir.CONFIG).write_text("model: [unclosed\n")
    code, err = cli("visualize", f"run_dir={done}")
    refused(code, err, "config.yaml cannot be read")


def test_visualize_on_a_file_instead_of_a_run(tmp_path, cli):
    path = tmp_path / "file.txt"
    path.write_text("")
    code, err = cli("visualize", f"run_dir={path}")
    refused(code, err, "is not a directory")


def test_report_lists_malformed_runs_with_their_errors(done, tmp_path, cli):
    sweep = tmp_path / "sweep"
    for job, damage in (("0", None), ("1", "summary"), ("2", "config")):
        shutil.copytree(done, sweep / job)
        if damage == "summary":
            (sweep / job / rundir.SUMMARY).write_text('{"status": "compl')
        elif damage == "config":
            (sweep / job / rundir.CONFIG).write_text("trainer: [unclosed\n")
    code, err = cli("report", str(sweep))
    assert code == 0, err
    md, csv = ((sweep / f"report.{ext}").read_text() for ext in ("md", "csv"))
    assert "3 runs, 2 completed" in md  # job 2's summary is whole: its results count
    assert "summary.json cannot be read" in md  # job 1 did not complete: listed with why
    assert "config.yaml cannot be read" in csv  # job 2's problem, on its row


def test_report_on_a_directory_without_runs(tmp_path, cli):
    code, err = cli("report", str(tmp_path))
    assert code == 2 and "no runs under" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (("format=xml",), "format='xml': use table, markdown or json"),
        (("model=alexnet", "model.input_size=28"), "'pool2'"),
        (("model=vgg11", "model.input_size=32"), "head_pool=7"),
    ],
)
def test_summary_errors(args, message, cli):
    code, err = cli("summary", *args)
    refused(code, err, message)


def test_bench_with_an_unknown_mode(cli):
    code, err = cli("bench", "bench.mode=fastest")
    refused(code, err, "bench.mode='fastest': use one of ['throughput', 'time_to_accuracy']")


def test_every_config_of_the_project_passes_the_checks(compose_cfg, tmp_path):
    from cnnjax import validation

    for cls in ("cats", "dogs"):  # the image folder config needs one: its classes
        (tmp_path / cls).mkdir()
    for group in ("model", "dataset", "optimizer", "schedule"):
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            folder = [f"dataset.source_dir={tmp_path}"] if path.stem == "image_folder" else []
            assert validation.problems(compose_cfg(f"{group}={path.stem}", *folder)) == [], path


def test_idx_images_of_another_size_than_the_config(tmp_path, idx_dir, cli):
    source = tmp_path / "wide"
    shutil.copytree(idx_dir, source)
    for stem, n in (("train", 1024), ("t10k", 256)):
        write_idx(source / f"{stem}-images-idx3-ubyte", np.zeros((n, 28, 30), np.uint8))
    code, err = cli.train(tmp_path / "run", idx_dir, f"dataset.source_dir={source}")
    refused(code, err, "images are 28x30x1", "dataset.image_size=28")


def test_idx_files_that_do_not_belong_together(tmp_path, idx_dir, cli):
    source = tmp_path / "mixed"
    shutil.copytree(idx_dir, source)
    write_idx(source / "t10k-images-idx3-ubyte", np.zeros((256, 32, 32), np.uint8))
    code, err = cli.train(tmp_path / "run", idx_dir, f"dataset.source_dir={source}")
    refused(code, err, "the train images are 28x28 and the test images 32x32")
    write_idx(source / "t10k-images-idx3-ubyte", np.zeros((100, 28, 28), np.uint8))
    code, err = cli.train(tmp_path / "run", idx_dir, f"dataset.source_dir={source}")
    refused(code, err, "100 test images but 256 labels")
