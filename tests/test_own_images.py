"""Your own images in, a usable model out: an image folder made from Fashion-MNIST test images
(PNG and JPEG, grey and RGB, two sizes, one corrupt file) trains, and the run is evaluated,
asked about the saved files and exported as StableHLO and ONNX."""

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax.numpy as jnp
import numpy as np
import onnxruntime  # the onnx extra, which `make test` installs
import pytest
from helpers import FASHION_MNIST, command, fashion_image_folder

from cnnjax import data, exports, folders, layers, rundir, trained

PER_CLASS = 120  # 1,200 images: 960 to train on, 240 to test
FOLDER_ARGS = ("dataset=image_folder", "dataset.image_size=28", "dataset.channels=1")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    fashion_image_folder(root, PER_CLASS)
    return root


@pytest.fixture(scope="module")
def run_dir(photos, tmp_path_factory) -> Path:
    """A run of mnist_allconv trained 300 steps on the folder."""
    run_dir = tmp_path_factory.mktemp("run")
    code = command(
        "train", *FOLDER_ARGS, f"dataset.source_dir={photos}", "trainer.max_steps=300",
        "trainer.batch_size=64", "trainer.eval_batch_size=100", "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert code == 0
    return run_dir


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_the_folder_trains_past_075(run_dir, photos):
    s = summary(run_dir)
    assert s["status"] == "completed" and s["steps"] == 300
    assert s["test_accuracy"] > 0.75
    assert s["class_names"] == sorted(p.name for p in photos.iterdir())
    assert s["run"]["dataset.source"].startswith("image_folder sha256:")
    # the training images' own normalisation: near the chosen Fashion-MNIST images' (the JPEGs
    # and the resized files change them slightly, and the test fifth is held out)
    images, labels = data.read_idx_split(FASHION_MNIST, "test")
    chosen = np.concatenate([np.flatnonzero(labels == k)[:PER_CLASS] for k in range(10)])
    assert s["normalisation"]["mean"] == pytest.approx([images[chosen].mean() / 255], abs=0.01)
    assert s["normalisation"]["std"] == pytest.approx([images[chosen].std() / 255], abs=0.01)


def test_evaluate_equals_the_runs_final_metrics(run_dir, photos, run_command):
    done = run_command("evaluate", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr
    result, s = json.loads((run_dir / "eval.json").read_text()), summary(run_dir)
    assert (result["accuracy"], result["loss"]) == (s["test_accuracy"], s["test_loss"])
    assert result["examples"] == 240 and result["checkpoint_step"] == 300
    matrix = np.array(result["confusion_matrix"])
    assert matrix.sum() == 240 and np.trace(matrix) / 240 == result["accuracy"]
    per_class = [result["per_class_accuracy"][n] for n in s["class_names"]]
    assert per_class == pytest.approx(np.diag(matrix) / matrix.sum(1))
    assert f"accuracy {s['test_accuracy']:.4f}" in done.stdout
    # the same split named as another dataset: loaded through the other path, same numbers
    again = run_command(
        "evaluate", f"run_dir={run_dir}", *FOLDER_ARGS, f"dataset.source_dir={photos}"
    )
    assert again.returncode == 0, again.stderr
    other = json.loads((run_dir / "eval_image_folder_test.json").read_text())
    assert (other["accuracy"], other["loss"]) == (result["accuracy"], result["loss"])


def test_evaluate_refuses_data_the_run_cannot_judge(run_dir, photos, run_command):
    folder = ("dataset=image_folder", f"dataset.source_dir={photos}")
    refused(
        run_command("evaluate", f"run_dir={run_dir}", *folder),  # 32x32 RGB by default
        "images are 32x32x3, but the run was trained on 28x28x1 images",
    )
    names = "[" + ",".join(f"c{k}" for k in range(10)) + "]"  # the same shape, other classes
    refused(
        run_command("evaluate", f"run_dir={run_dir}", *FOLDER_ARGS, f"dataset.source_dir={photos}",
                    f"dataset.class_names={names}"),
        "labels are compared by position",
    )  # fmt: skip


def test_a_run_whose_data_changed_is_refused(run_dir, photos, tmp_path, run_command):
    """The folder of a finished run loses a file: its test split and normalisation would be
    others, so evaluate, predict and export refuse the run."""
    shutil.copytree(photos, tmp_path / "photos")
    next((tmp_path / "photos" / "Bag").iterdir()).unlink()
    shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("export", "eval*"))
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace(str(photos), str(tmp_path / "photos")))
    refused(
        run_command("evaluate", f"run_dir={tmp_path / 'run'}"),
        "was trained on other data or settings than its config gives now: dataset.source:",
    )


def test_predict_agrees_with_evaluate(run_dir, photos, run_command):
    if not (run_dir / "eval.csv").exists():
        assert run_command("evaluate", f"run_dir={run_dir}").returncode == 0
    with (run_dir / "eval.csv").open() as f:
        rows = list(csv.DictReader(f))
    files = [str(photos / row["file"]) for row in rows]
    broken = photos / "T-shirt-top" / "broken.png"
    done = run_command(
        "predict", f"run_dir={run_dir}", f"images=[{','.join([*files, str(broken)])}]",
        "format=json", "top_k=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert [p["file"] for p in result["predictions"]] == files
    assert [p["top"][0]["class"] for p in result["predictions"]] == [r["predicted"] for r in rows]
    assert [p["top"][0]["probability"] for p in result["predictions"]] == pytest.approx(
        [float(r["probability"]) for r in rows], abs=1e-5
    )
    assert all(len(p["top"]) == 2 for p in result["predictions"])
    assert list(result["unreadable"]) == [str(broken)]
    table = run_command("predict", f"run_dir={run_dir}", f"images={files[0]}").stdout.strip()
    best = result["predictions"][0]["top"][0]
    assert table.splitlines()[-1].startswith(f"{files[0]}  {best['class']} (")


@pytest.fixture(scope="module")
def test_images(run_dir) -> tuple[np.ndarray, np.ndarray]:
    """The first 64 test images of the run and the run's logits of them."""
    run = trained.load(run_dir, "auto")
    images = run.recipe.test_split.images_NxHxWxC[:64]
    return images, trained.logits(run, images)


def test_stablehlo_runs_without_the_model_code(run_dir, test_images, tmp_path, run_command):
    done = run_command("export", f"run_dir={run_dir}", "format=stablehlo")
    assert done.returncode == 0, done.stderr
    described = json.loads((run_dir / "export" / "model.stablehlo.json").read_text())
    assert described["check"]["max_abs_diff_from_jax"] < 1e-5
    images, expected = test_images
    np.save(tmp_path / "images.npy", images)
    program = (
        "import sys, numpy as np; from jax import export; "
        f"f = export.deserialize(bytearray(open({str(run_dir / 'export' / 'model.stablehlo')!r}, "
        "'rb').read())); "
        f"np.save({str(tmp_path / 'logits.npy')!r}, np.asarray(f.call(np.load("
        f"{str(tmp_path / 'images.npy')!r})))); "
        "assert not any(m.startswith(('cnnjax', 'flax')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120, cwd=tmp_path)
    got = np.load(tmp_path / "logits.npy")
    assert np.abs(got - expected).max() < 1e-4  # XLA's convolutions against the run's oneDNN
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_onnx_matches_jax(run_dir, test_images, run_command):
    done = run_command("export", f"run_dir={run_dir}", "format=onnx")
    assert done.returncode == 0, done.stderr
    path = run_dir / "export" / "model.onnx"
    assert (
        json.loads(path.with_name("model.onnx.json").read_text())["check"]["max_abs_diff_from_jax"]
        < 1e-5
    )
    images, expected = test_images
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):  # any batch size
        got = session.run(None, {session.get_inputs()[0].name: batch})[0]
        assert np.abs(got - expected[: len(batch)]).max() < 1e-4
        assert (got.argmax(-1) == expected[: len(batch)].argmax(-1)).all()


def test_the_folder_is_prepared_once_per_content(photos, tmp_path, caplog):
    settings = {"image_size": 28, "channels": 1, "test_fraction": 0.2, "split_seed": 0}
    logger = logging.getLogger("cnnjax.folders")  # commands run in this process reset logging
    with mock.patch.object(logger, "disabled", False), mock.patch.object(logger, "handlers", []):
        logger.addHandler(caplog.handler)
        logger.setLevel(logging.WARNING)
        first = data.load("photos", str(tmp_path), str(photos), folder=settings)
    assert len(first.train.labels_N) + len(first.test.labels_N) == 10 * PER_CLASS
    assert "skipped 1 of the" in caplog.text and "broken.png" in caplog.text
    assert set(first.test.files_N) & set(first.train.files_N) == set()
    info = next((tmp_path / "folder_images").glob("*/*/dataset_info.json"))
    written = info.stat().st_mtime_ns
    again = data.load("photos", str(tmp_path), str(photos), folder=settings)
    assert again.source == first.source and info.stat().st_mtime_ns == written  # not prepared again
    np.testing.assert_array_equal(again.test.images_NxHxWxC, first.test.images_NxHxWxC)
    reseeded = data.load("photos", str(tmp_path), str(photos), folder=settings | {"split_seed": 1})
    assert reseeded.source != first.source
    assert set(reseeded.test.files_N) != set(first.test.files_N)
    assert len(list((tmp_path / "folder_images").iterdir())) == 2
    assert folders.count_classes(str(photos)) == 10


def refused(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2 and one paragraph holding every fragment."""
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert all(f in done.stderr for f in fragments), done.stderr


def test_a_folder_that_cannot_be_used_is_named_before_anything_is_written(
    photos, tmp_path, run_command
):
    run_dir = tmp_path / "run"
    train = ("train", "dataset=image_folder", f"hydra.run.dir={run_dir}")
    refused(run_command(*train), "dataset.source_dir=null must be the folder of your images")
    refused(run_command(*train, f"dataset.source_dir={tmp_path / 'none'}"), "does not exist")
    refused(
        run_command(*train, f"dataset.source_dir={photos}", "dataset.channels=2"),
        "dataset.channels=2 must be 1 (grey) or 3 (RGB)",
    )
    refused(
        run_command(*train, f"dataset.source_dir={photos}", "dataset.test_fraction=1"),
        "dataset.test_fraction=1 must be a number in (0, 1)",
    )
    assert not rundir.holds_run(run_dir)  # no config, summary, metrics or checkpoint


def test_the_commands_name_what_they_lack(run_dir, tmp_path, run_command):
    for name in ("evaluate", "predict", "export"):
        refused(run_command(name), "run_dir=null")
        images = ["images=x.png"] if name == "predict" else []
        refused(run_command(name, f"run_dir={tmp_path}", *images),
                "does not exist" if images else "holds no config.yaml")  # fmt: skip
    refused(run_command("predict", f"run_dir={run_dir}"), "images=null")
    refused(run_command("predict", f"run_dir={run_dir}", f"images={tmp_path}"), "no image files")
    refused(run_command("export", f"run_dir={run_dir}", "format=png"), "format='png'")
    refused(run_command("evaluate", f"run_dir={run_dir}", "split=val"), "split='val'")


def test_an_export_the_converter_gets_wrong_is_refused_and_the_earlier_kept(tmp_path):
    pool = layers.MaxPool(3, 2, padding=1)  # jax2onnx converts 'SAME'/'VALID' pool padding only
    fn = lambda im: pool.apply({}, im.astype(jnp.float32)).reshape(im.shape[0], -1)  # noqa: E731
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), np.uint8)
    (tmp_path / "model.onnx").write_bytes(b"an earlier export")
    with pytest.raises(exports.ExportError, match="Nothing was written"):
        exports.write(fn, images, "onnx", tmp_path, {})
    assert (tmp_path / "model.onnx").read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    exports.write(fn, images, "stablehlo", tmp_path, {})  # every model exports as StableHLO
    assert (tmp_path / "model.stablehlo").stat().st_size > 0
