"""What several test modules use (conftest.py's directory is on sys.path): the configs and the
models to run, generated IDX data, the training CLI, and what a run wrote."""

import gzip
import importlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from cnnjax import layers, runtime
from cnnjax.runtime import CONF_DIR

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
# Every architecture once, the large ones as their small-input configs (conf/model/*_small.yaml)
RUNNABLE = [m for m in MODELS if f"{m}_small" not in MODELS]


def compose_config(name: str, *overrides: str, hydra: bool = False) -> DictConfig:
    """conf/<name>.yaml with `overrides`; `hydra` keeps Hydra's own node."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


def command(name: str, *args: str) -> int:
    """`python -m cnnjax.<name> args`, run in this process as the CLI runs it: its exit status.
    What it prints goes where pytest captures it (capsys), not to a stream of our own: absl's log
    handler closes the stream it holds when that is no longer sys.stderr, pytest's included."""
    module = importlib.import_module(f"cnnjax.{name}" + (".__main__" if name == "bench" else ""))
    argv = list(args) if name == "report" else ["--config-path", str(CONF_DIR), *args]
    GlobalHydra.instance().clear()
    with mock.patch.object(sys, "argv", [name, *argv]):
        try:
            module.main(argv) if name == "report" else module.main()
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
        finally:  # a command may have pointed JAX's cache elsewhere: back to the session's
            runtime.use_compilation_cache(os.environ.get("JAX_COMPILATION_CACHE_DIR"))
    return 0


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


def train_args(idx_dir: Path, *overrides: str, multirun: bool = False) -> list[str]:
    """The arguments of `python -m cnnjax.train` on the generated dataset `idx_dir`."""
    return [
        *(["-m"] if multirun else []),
        f"dataset.source_dir={idx_dir}",
        "dataset.name=toy",
        "trainer.progress=false",
        "trainer.eval_batch_size=100",
        *overrides,
    ]


def cli(idx_dir: Path, *overrides: str, multirun=False, check=True):
    """`python -m cnnjax.train` on `idx_dir` in a process of its own, for the tests where the
    process is the point (killed, a second one); the others run it in this process (conftest's
    `run_train`)."""
    args = train_args(idx_dir, *overrides, multirun=multirun)
    args = [sys.executable, "-m", "cnnjax.train", *args]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_here(idx_dir: Path, *overrides: str, multirun: bool = False) -> int:
    """`python -m cnnjax.train` on `idx_dir` in this process: its exit status (what it prints
    goes to pytest's capture)."""
    return command("train", *train_args(idx_dir, *overrides, multirun=multirun))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints a run directory holds."""
    root = run_dir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def final_arrays(run_dir: Path) -> dict:
    """The newest checkpoint's arrays, read onto this process's first device whatever the
    devices and processes that saved them."""
    path = (run_dir / "checkpoints" / str(checkpoint_steps(run_dir)[-1]) / "state").absolute()
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path).item_metadata
        like = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here)  # noqa: E731
        return checkpointer.restore(path, jax.tree.map(like, saved))


class RunningSum(nn.Module):
    """A model whose final receptive field the analysis cannot know: a running sum down the
    rows (`jnp.cumsum` has no rule) between two convs, then a global average and a dense layer;
    the input and class count of the generated dataset's models (28x28x1, 10 classes)."""

    num_classes: int = 10
    input_size: int = 28
    in_channels: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(layers.conv(4, 3, name="c1")(x))
        x = jnp.cumsum(x, axis=1) / x.shape[1]
        x = nn.relu(layers.conv(4, 3, name="c2")(x))
        return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def fashion_image_folder(root: Path, per_class: int) -> dict[str, list[Path]]:
    """Fashion-MNIST test images as a folder of image files, one sub-folder per class
    (T-shirt/top's slash made a dash): PNG and JPEG, grey and RGB, 28x28 and larger, and one
    corrupt file in the first class. Returns each class folder's files."""
    from PIL import Image

    from cnnjax import data

    images, labels = data.read_idx_split(FASHION_MNIST, "test")
    names = [n.replace("/", "-") for n in runtime.compose("train").dataset.class_names]
    files: dict[str, list[Path]] = {}
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        chosen = np.flatnonzero(labels == k)[:per_class]
        files[name] = []
        for i, index in enumerate(chosen):
            image = Image.fromarray(images[index])
            kind = i % 4
            if kind == 1:
                image = image.convert("RGB")  # grey in three channels
            if kind == 2:
                image = image.resize((56, 56), Image.Resampling.BILINEAR)  # a larger file
            path = root / name / f"{index:05d}.{'jpg' if kind == 3 else 'png'}"
            image.save(path, quality=95) if kind == 3 else image.save(path)
            files[name].append(path)
    (root / names[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return files
