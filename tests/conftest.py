"""Shared fixtures: the real Hydra config, and small generated IDX datasets."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """Write uint8 `array` as an IDX file (magic 0x0801 for 1-d labels, 0x0803 for images)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def make_idx_dataset(root: Path, n_train: int, n_test: int, gz: bool = True, seed: int = 0) -> dict:
    """Four IDX files of learnable 28x28 images: class k lights up row band k, plus noise."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 6, 4:24] = 250
        write_idx(root / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, gz)
        arrays[split] = (images, labels)
    return arrays


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
