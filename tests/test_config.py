"""Every option of every config group composes and instantiates; bad options fail clearly."""

import subprocess
import sys

import optax
import pytest
from conftest import CONF_DIR
from hydra.utils import instantiate


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
def test_dataset_configs_compose(compose_cfg, name):
    ds = compose_cfg(f"dataset={name}").dataset
    assert len(ds.mean) == len(ds.std) in (1, ds.channels)
    assert ds.num_classes > 1 and ds.image_size > 0 and ds.data_dir


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
