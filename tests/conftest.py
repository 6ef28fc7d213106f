"""Shared fixtures: the real Hydra config and a small generated IDX dataset (the helpers they use
are in helpers.py, beside this file)."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from absl import logging as absl_logging
from helpers import CONF_DIR, command, make_idx_dataset, train_here
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from cnnjax import runtime

# The suite compiles much and runs little: XLA's backend optimisations (LLVM at -O2) take most
# of its compile time (a 7x longer init of the all-conv net) and buy nothing for a few steps.
# Set before JAX starts its backend; subprocesses inherit it. No test measures speed.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"

# absl's log handler writes to the sys.stderr of its import (pytest's capture of the moment) and
# closes that stream when Hydra reconfigures logging in a command run in this process: it gets
# the process's own stderr, which pytest captures at the file descriptor and absl never closes.
absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)


@pytest.fixture(scope="session", autouse=True)
def caches(tmp_path_factory) -> Iterator[Path]:
    """Prepared datasets and compilations in this session's directory (the configs' defaults
    read these variables), shared by its tests and never the user's: what one test compiled,
    the next loads (the tests initialise the same models again and again)."""
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TFDS_DATA_DIR", str(root / "tfds"))
        m.setenv("JAX_COMPILATION_CACHE_DIR", str(root / "jax"))
        runtime.use_compilation_cache(str(root / "jax"))
        yield root
    runtime.use_compilation_cache(None)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    """A small learnable IDX dataset: 1,024 train and 256 test images."""
    root = tmp_path_factory.mktemp("idx")
    make_idx_dataset(root, 1024, 256)
    return root


@pytest.fixture
def compose_cfg():
    """Compose conf/train.yaml with overrides as the CLI does: Hydra's part goes to HydraConfig,
    the job gets the rest."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    return _compose


@pytest.fixture
def run_command(capsys):
    """`python -m cnnjax.<name> args` in this process: a CompletedProcess (exit status, stdout
    with the logs, stderr), as subprocess.run would give, without a new interpreter."""

    def _run(name: str, *args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = command(name, *args)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([name, *args], code, out, err)

    return _run


@pytest.fixture
def run_train(capsys):
    """`helpers.cli`'s training run, in this process."""

    def _run(idx_dir: Path, *overrides: str, multirun=False, check=True):
        capsys.readouterr()
        code = train_here(idx_dir, *overrides, multirun=multirun)
        out, err = capsys.readouterr()
        if check:
            assert code == 0, (out + err)[-3000:]
        return subprocess.CompletedProcess(overrides, code, out, err)

    return _run
