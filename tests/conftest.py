"""Shared fixtures: the real Hydra config and a small generated IDX dataset (the helpers they use
are in helpers.py, beside this file)."""

from pathlib import Path

import pytest
from helpers import CONF_DIR, make_idx_dataset
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict


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
