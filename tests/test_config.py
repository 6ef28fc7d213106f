"""Every option of every config group composes and instantiates; bad options fail clearly."""

import itertools
import subprocess
import sys
from pathlib import Path

import optax
import pytest
from helpers import CONF_DIR, RUNNABLE
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cnnjax import analysis


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_groups_have_options():
    assert {"mnist_allconv", "lenet", "lenet5", "alexnet", "blocknet"} <= set(options("model"))
    assert {"adam", "adamw", "sgd"} <= set(options("optimizer"))
    assert {"fashion_mnist"} <= set(options("dataset"))


def test_trainer_section(compose_cfg):
    t = compose_cfg().trainer
    for key in ("epochs", "max_steps", "batch_size", "eval_every", "seed"):
        assert key in t


@pytest.mark.parametrize("name", options("model"))
def test_model_configs_instantiate(compose_cfg, name):
    model = instantiate(compose_cfg(f"model={name}").model)
    assert model.num_classes == 10  # from the dataset config
    assert model.input_size > 0 and model.in_channels in (1, 3)


@pytest.mark.parametrize("opt", options("optimizer"))
@pytest.mark.parametrize("sched", options("schedule"))
def test_optimizer_and_schedule_configs_instantiate(compose_cfg, opt, sched):
    cfg = compose_cfg(f"optimizer={opt}", f"schedule={sched}")
    schedule = instantiate(cfg.schedule)(cfg.optimizer.learning_rate, 1000)
    tx = instantiate(cfg.optimizer)(learning_rate=schedule)
    assert isinstance(tx, optax.GradientTransformation)
    lr = cfg.optimizer.learning_rate
    assert 0 < float(schedule(500)) <= lr  # mid-run: positive, never above the peak
    if sched == "constant":
        assert float(schedule(0)) == pytest.approx(lr) == float(schedule(999))


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_configs_compose(compose_cfg, name, tmp_path):
    for cls in ("cats", "dogs", "emus"):  # an image folder's classes are its sub-folders
        (tmp_path / cls).mkdir()
    ds = compose_cfg(f"dataset={name}", f"dataset.source_dir={tmp_path}").dataset
    if ds.mean is None:  # the training images' own
        assert ds.std is None
    else:
        assert len(ds.mean) == len(ds.std) in (1, ds.channels)
    assert ds.num_classes > 1 and ds.image_size > 0 and ds.data_dir
    if name == "image_folder":
        assert ds.num_classes == 3


def test_unknown_model_lists_the_options():
    proc = subprocess.run(
        [sys.executable, "-m", "cnnjax.train", "model=nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Could not find 'model/nope'" in proc.stderr
    for name in options("model"):
        assert name in proc.stderr  # Hydra lists the available options


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_compose_and_instantiate(compose_cfg, name):
    cfg = compose_cfg(f"+experiment={name}")
    model = instantiate(cfg.model)
    assert model.num_classes == cfg.dataset.num_classes
    schedule = instantiate(cfg.schedule)(cfg.optimizer.learning_rate, 100)
    tx = instantiate(cfg.optimizer)(learning_rate=schedule)
    assert isinstance(tx, optax.GradientTransformation)


STUDIES = CONF_DIR.parent / "experiments"
SWEEPS = sorted(STUDIES.glob("*/*.yaml"))  # each study's sweep configs (rf_study, zoo_small, ...)


def compose_study(path: Path, *overrides: str) -> DictConfig:
    """A study's sweep config as `--config-dir <study> --config-name <name>` composes it."""
    with initialize_config_dir(str(path.parent), version_base="1.3"):
        return compose(path.stem, [f"hydra.searchpath=[file://{CONF_DIR}]", *overrides])


def model_jobs(path: Path) -> list[tuple[str, ...]]:
    """The model overrides of every job of a study's sweep (`model`, `model.*` keys)."""
    parser = OverridesParser.create()
    choices = [
        [f"{key}={v}" for v in parser.parse_override(f"{key}={value}").sweep_string_iterator()]
        for key, value in OmegaConf.load(path).hydra.sweeper.params.items()
        if key == "model" or key.startswith("model.")
    ]
    return list(itertools.product(*choices))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_model_a_study_sweeps_builds(path):
    """Each job's model composes from the study's config and its geometry checks out."""
    jobs = model_jobs(path)
    assert jobs
    for job in jobs:
        model = instantiate(compose_study(path, *job).model)
        table = analysis.analyze(model, (1, model.input_size, model.input_size, model.in_channels))
        assert table.rows[-1].output_shape[-1] == 10, job


def test_the_zoo_trains_every_architecture():
    """Each model config, the large ones as their small-input configs (conf/model/*_small)."""
    zoo = {o.split("=")[1] for p in STUDIES.glob("zoo/zoo_*.yaml") for (o,) in model_jobs(p)}
    assert zoo == set(RUNNABLE)
    assert zoo | {m.removesuffix("_small") for m in zoo} == set(options("model"))
