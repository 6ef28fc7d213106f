"""`python -m cnnjax.visualize`: a tiny trained run drawn (`plots.run_pictures`), its receptive
field against the input gradient (`probe`), loading a run and its errors (`trained`), and the
feature-map capture of every model config (shapes only)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from helpers import RUNNABLE, RunningSum, compose_config, train_here
from hydra.utils import instantiate

from cnnjax import analysis, models, probe, recipe, trained
from cnnjax.errors import ConfigError, RunDirError
from cnnjax.plots import figures, run_pictures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# mnist_allconv's PNGs, (height, width) in pixels at 100 dpi
MAP = (475, 1000)  # 4 images x (input + 8 channels) 1-inch panels, + colour bar and title
PNG_SIZES = {
    "kernels.png": (175, 900),  # 8 3x3 kernels in a row of 1-inch panels, + colour bar and title
    **{f"feature_maps/{k}_conv{k}.png": MAP for k in range(1, 8)},  # every conv has >= 8 channels
    "receptive_field.png": (480, 1000),
    "curves.png": (480, 1280),
    "confusion.png": (640, 800),
}
STAGES = {  # what some feature maps are: post-activation where the model has one
    "mnist_allconv": {"conv1": "Conv → ReLU", "conv7": "Conv"},  # conv7 gives the logits
    "blocknet": {"transition1_conv": "Conv → ReLU", "classifier": "Conv"},
    "resnet18_small": {
        "conv1": "Conv → BatchNorm → ReLU",
        "layer1_0/conv1": "Conv → BatchNorm → ReLU",
        "layer1_0/conv2": "Conv → BatchNorm",  # then the residual add, then ReLU
        "layer2_0/downsample_conv": "Conv → BatchNorm",
    },
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, idx_dir) -> Path:
    """A 3-step mnist_allconv run on the generated IDX data (checkpoint at step 3)."""
    run = tmp_path_factory.mktemp("visualize") / "run"
    args = ("trainer.max_steps=3", "trainer.log_every=1", f"hydra.run.dir={run}")
    assert train_here(idx_dir, *args) == 0
    return run


@pytest.fixture(scope="module")
def result(run_dir) -> run_pictures.Result:
    return run_pictures.draw(**compose_config("visualize", f"run_dir={run_dir}"))


def test_every_png_is_written_at_its_size(run_dir, result):
    out = run_dir / "visualize"
    assert sorted(result.files) == sorted(out / name for name in PNG_SIZES)
    for name, (height, width) in PNG_SIZES.items():
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(out / name).shape == (height, width, 4), name
    assert f"wrote {out / 'confusion.png'}" in result.lines


def test_the_confusion_matrix_is_the_runs_last_evaluation(run_dir, result):
    summary = json.loads((run_dir / "summary.json").read_text())
    matrix = result.confusion
    assert matrix.shape == (10, 10) and matrix.sum() == 256  # the whole test split
    assert np.trace(matrix) / 256 == pytest.approx(summary["test_accuracy"], abs=1.5 / 256)


def test_receptive_field_agrees_with_the_gradient_footprint(result):
    rf = result.receptive_field
    assert (rf.layer, rf.unit, rf.rf, rf.centre) == ("conv7", (0, 0), (40, 40), (14.0, 14.0))
    assert rf.window == ((-6, 33), (-6, 33))  # 14 ± 19.5 pixel centres: 6 beyond every side
    assert rf.beyond == {"top": 6, "bottom": 6, "left": 6, "right": 6}
    assert rf.clipped == rf.footprint == ((0, 27), (0, 27))  # the whole 28x28 image
    assert "= the clipped window" in rf.gradient_text()


def test_a_chosen_unit_sees_its_window_and_nothing_outside(run_dir):
    run = trained.load(run_dir)
    table = run.recipe.table
    rows = {r.name: r for r in table.rows}
    pool1 = [rows["pool1"].axis_rf(a) for a in range(2)]
    assert [(rf.centre(0), rf.window(0)) for rf in pool1] == [(1.0, (-2, 3))] * 2  # rf 6, start 1
    assert probe.choose_unit(table, "conv5", None) == (rows["conv5"], (2, 2))  # 5x5: centre
    row, unit = probe.choose_unit(table, "conv5", [1, 2])
    x = run.recipe.preprocess(run.recipe.test_split.images_NxHxWxC[:1])
    gradient = probe.unit_gradient(run.recipe.model, run.variables, x, "conv5", unit)
    rf = probe.receptive_field(row, unit, gradient)
    assert rf.window == ((-2, 21), (2, 25))  # rf 24 around (6 + 4, 6 + 8)
    assert rf.footprint is not None and rf.footprint_inside
    assert not gradient[:, :2].any() and not gradient[:, 26:].any() and not gradient[22:].any()
    with pytest.raises(ConfigError, match=r"'conv5', whose output is 5x5"):
        probe.choose_unit(table, "conv5", [5, 0])
    with pytest.raises(ConfigError, match="choose one of .*'conv7'"):
        probe.choose_unit(table, "fc", None)


def test_the_default_unit_is_in_the_last_layer_whose_receptive_field_is_known():
    table = analysis.analyze(RunningSum(), (1, 12, 12, 1))  # a conv, cumsum, a conv
    rows = {r.name: r for r in table.rows}
    assert rows["c2"].rf is None and rows["c1"].rf == (3, 3)
    assert probe.choose_unit(table, None, None) == (rows["c1"], (4, 4))
    with pytest.raises(ConfigError, match="receptive field of 'c2' is unknown.*'c1'"):
        probe.choose_unit(table, "c2", None)


def test_a_directory_that_is_not_a_run_or_has_no_checkpoint_says_so(run_dir, tmp_path):
    with pytest.raises(RunDirError, match="holds no config.yaml") as info:
        trained.load(tmp_path)
    assert "python -m cnnjax.train" in str(info.value)
    shutil.copy(run_dir / "config.yaml", tmp_path)
    with pytest.raises(RunDirError, match="has no checkpoints/") as info:
        trained.load(tmp_path)
    assert f"hydra.run.dir={tmp_path}" in str(info.value)  # the fix: resume the run
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RunDirError, match="holds no checkpoint"):
        trained.load(tmp_path)
    with pytest.raises(ConfigError, match="run_dir is required"):
        run_pictures.draw(**compose_config("visualize"))


def test_cli_exits_2_naming_the_problem(tmp_path):
    cmd = [sys.executable, "-m", "cnnjax.visualize", f"run_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {tmp_path} holds no config.yaml")


def test_settings_and_helpers():
    assert run_pictures.confusion_count("auto", 10_000, 1_472_256) == 10_000  # mnist_allconv
    assert run_pictures.confusion_count("auto", 10_000, 1_131_201_056) == 1000  # alexnet
    assert run_pictures.confusion_count(300, 256, 1) == 256
    with pytest.raises(ConfigError, match="confusion_images=0"):
        run_pictures.confusion_count(0, 256, 1)
    names = [f"class {k}" for k in range(10)]
    cfg = compose_config("visualize", f"+dataset={{num_classes: 10, class_names: {names}}}")
    assert recipe.class_names(cfg.dataset, ["a"] * 10) == names
    three = compose_config("visualize", "+dataset={num_classes: 3}").dataset
    assert recipe.class_names(three, ["a", "b"]) == ["0", "1", "2"]
    assert recipe.class_names(three, ["a", "b", "c"]) == ["a", "b", "c"]
    grid = figures.mosaic(np.ones((5, 3, 3)), cols=2)  # 3 rows of 2, 1-pixel gaps
    assert grid.image.shape == (11, 7) and np.isnan(grid.image[3]).all()
    assert grid.centres == ([1.0, 5.0, 9.0], [1.0, 5.0])


@pytest.mark.parametrize("name", RUNNABLE)
def test_feature_maps_of_every_model(compose_cfg, name):
    model = instantiate(compose_cfg(f"model={name}").model)
    shape = models.input_shape(model, batch_size=2)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    stages: dict[str, str] = {}

    def capture(variables, x):
        maps, found = probe.feature_maps(model, variables, x)
        stages.update(found)
        return maps

    maps = jax.eval_shape(capture, variables, x)  # traced only: nothing is computed
    convs = [r for r in analysis.analyze(model, shape).rows if r.type == "Conv"]
    assert list(stages) == [r.name for r in convs]  # every conv, in call order
    shapes = {r.name: (2, *r.output_shape[1:]) for r in convs}  # conv outputs, batch 2
    assert {k: m.shape for k, m in maps.items()} == shapes
    assert all(s.startswith("Conv") for s in stages.values())
    assert {k: stages[k] for k in STAGES.get(name, {})} == STAGES.get(name, {})
