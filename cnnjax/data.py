"""Data: TFDS datasets (array_record, read with `tfds.data_source`) as uint8 NHWC arrays
(`cnnjax.batches` turns them into what a step takes).

Local IDX files (Fashion-MNIST from Debian's `dataset-fashion-mnist`, MNIST, KMNIST, ...) are
prepared once by the `IdxImages` builder; nothing is downloaded unless the user asks TFDS to.
"""

import contextlib
import dataclasses
import fcntl
import gzip
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from cnnjax.errors import CnnjaxError

log = logging.getLogger(__name__)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {0x0801: 1, 0x0803: 3}  # unsigned bytes, 1-d labels / 3-d images


class DataError(CnnjaxError, RuntimeError):
    """A dataset that cannot be found or prepared; the message says how to get it."""


class Split(NamedTuple):
    images_NxHxWxC: np.ndarray  # uint8
    labels_N: np.ndarray  # int32


# ---------------------------------------------------------------- IDX files and their builder


def find_idx_file(source_dir: Path, stem: str) -> Path | None:
    """`stem` or `stem.gz` in `source_dir`, whichever exists."""
    for name in (stem, stem + ".gz"):
        if (source_dir / name).is_file():
            return source_dir / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes: labels (N,) or images (N, H, W)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic not in _IDX_MAGIC:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#010x}).")
    ndim = _IDX_MAGIC[magic]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != np.prod(shape):
        raise DataError(f"{path} is truncated: header says {shape}, found {data.size} bytes.")
    return data.reshape(shape)


@dataclasses.dataclass
class IdxConfig(tfds.core.BuilderConfig):
    """One IDX dataset: its name, where its four files are, and its image shape."""

    source_dir: str = ""
    image_size: int = 28
    num_classes: int = 10


class IdxImages(tfds.core.GeneratorBasedBuilder):
    """Prepares the four MNIST-format IDX files of a directory, in their original order."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"IDX files from {self.builder_config.source_dir}",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the files' order: example i is image i
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in IDX_FILES}

    def _generate_examples(self, split: str):
        images, labels = read_idx_split(Path(self.builder_config.source_dir), split)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image[..., None], "label": int(label)}


def read_idx_split(source_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The (N, H, W) images and (N,) labels of one split, checked against each other."""
    paths = [find_idx_file(source_dir, stem) for stem in IDX_FILES[split]]
    missing = [stem for stem, p in zip(IDX_FILES[split], paths, strict=True) if p is None]
    if missing:
        raise FileNotFoundError(", ".join(missing))
    images, labels = (read_idx(p) for p in paths)
    if len(images) != len(labels):
        raise DataError(f"{source_dir}: {len(images)} images but {len(labels)} labels ({split}).")
    return images, labels


def missing_idx_message(name: str, source_dir: str, apt_package: str | None) -> str:
    wanted = ", ".join(f"{s}[.gz]" for pair in IDX_FILES.values() for s in pair)
    fixes = []
    if apt_package:
        fixes.append(f"install them with `sudo apt-get install {apt_package}`")
    fixes.append("set dataset.source_dir to a directory holding the four files")
    fixes.append(
        f"or read a prepared TFDS dataset instead with dataset.source_dir=null "
        f"(`tfds build {name}` where TFDS can download, with TFDS_DATA_DIR pointing at it)"
    )
    return (
        f"Dataset '{name}': the IDX files are not in {source_dir} (expected {wanted}). "
        + "; ".join(fixes)
        + "."
    )


# ---------------------------------------------------------------- loading through TFDS


@contextlib.contextmanager
def preparation_lock(data_dir: str, name: str) -> Iterator[None]:
    """One process at a time prepares dataset `name` in `data_dir` (the jobs of a parallel
    sweep, the processes of a distributed run); the others wait, then read what it wrote."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with (Path(data_dir) / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def load_split(
    name: str,
    split: str,
    data_dir: str,
    source_dir: str | None = None,
    image_size: int = 28,
    num_classes: int = 10,
    apt_package: str | None = None,
) -> Split:
    """One split as uint8 NHWC images and int32 labels, read with `tfds.data_source`.

    With `source_dir`, the IDX files there are prepared first (once) as `idx_images/<name>`;
    without it, `name` is a TFDS dataset already prepared in `data_dir` (array_record).
    """
    data_dir = os.path.expanduser(data_dir)
    if source_dir:
        if any(find_idx_file(Path(source_dir), s) is None for s in IDX_FILES[split]):
            raise DataError(missing_idx_message(name, source_dir, apt_package))
        config = IdxConfig(
            name=name, source_dir=source_dir, image_size=image_size, num_classes=num_classes
        )
        with preparation_lock(data_dir, f"idx_images-{name}"):
            source = tfds.data_source(
                "idx_images",
                split=split,
                data_dir=data_dir,
                builder_kwargs={"config": config, "file_format": "array_record"},
            )
    else:
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # TFDS raises several types for "not prepared here"
            raise DataError(
                f"Dataset '{name}' ({split}) is not prepared in {data_dir} as array_record: {e} "
                f"Prepare it where TFDS can download (`tfds build {name} "
                f"--file_format=array_record --data_dir {data_dir}`), or set dataset.source_dir "
                "to a directory of IDX files."
            ) from e
    records = source.__getitems__(range(len(source)))
    images = np.stack([r["image"] for r in records]).astype(np.uint8)
    labels = np.array([r["label"] for r in records], dtype=np.int32)
    return Split(images, labels)
