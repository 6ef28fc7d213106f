"""Data: TFDS datasets (array_record, read with `tfds.data_source`) as uint8 NHWC arrays
(`cnnjax.batches` turns them into what a step takes).

Local IDX files (Fashion-MNIST from Debian's `dataset-fashion-mnist`, MNIST, KMNIST, ...) are
prepared once by the `IdxImages` builder; nothing is downloaded unless the user asks TFDS to.
"""

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from cnnjax import folders
from cnnjax.errors import DataError

log = logging.getLogger(__name__)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {0x0801: 1, 0x0803: 3}  # unsigned bytes, 1-d labels / 3-d images


class Split(NamedTuple):
    images_NxHxWxC: np.ndarray  # uint8
    labels_N: np.ndarray  # int32
    files_N: np.ndarray | None = None  # str: each image's file, where the data records it


# ---------------------------------------------------------------- IDX files and their builder


def find_idx_file(source_dir: Path, stem: str) -> Path | None:
    """`stem` or `stem.gz` in `source_dir`, whichever exists."""
    for name in (stem, stem + ".gz"):
        if (source_dir / name).is_file():
            return source_dir / name
    return None


def _read_bytes(path: Path, size: int = -1) -> bytes:
    """The first `size` bytes of an IDX file (all with -1), gunzipped where it is a .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read(size)
    except (OSError, EOFError, zlib.error) as e:  # a cut or damaged .gz
        raise DataError(
            f"{path} cannot be read ({e}): the file is damaged; restore it (for Fashion-MNIST: "
            "`sudo apt-get install --reinstall dataset-fashion-mnist`)."
        ) from None


def _header(path: Path, raw: bytes) -> tuple[int, ...]:
    """The shape an IDX header declares."""
    magic = int.from_bytes(raw[0:4], "big")
    if magic not in _IDX_MAGIC:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#010x}).")
    ndim = _IDX_MAGIC[magic]
    return tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def idx_shape(path: Path) -> tuple[int, ...]:
    """The shape of an IDX file, from its header alone."""
    return _header(path, _read_bytes(path, 16))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes: labels (N,) or images (N, H, W)."""
    raw = _read_bytes(path)
    shape = _header(path, raw)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * len(shape))
    if data.size != np.prod(shape):
        raise DataError(f"{path} is truncated: header says {shape}, found {data.size} bytes.")
    return data.reshape(shape)


def idx_paths(source_dir: Path) -> list[Path]:
    """The four IDX files of `source_dir` (train images, labels, test images, labels)."""
    return [find_idx_file(source_dir, stem) for pair in IDX_FILES.values() for stem in pair]


def check_idx_files(source_dir: Path) -> None:
    """DataError unless the four files agree: images of one size, a label per image (from their
    headers: nothing else is read)."""
    (train_x, train_y), (test_x, test_y) = (
        [idx_shape(find_idx_file(source_dir, stem)) for stem in pair] for pair in IDX_FILES.values()
    )
    if train_x[1:] != test_x[1:]:
        raise DataError(
            f"{source_dir}: the train images are {train_x[1]}x{train_x[2]} and the test images "
            f"{test_x[1]}x{test_x[2]}: both splits need images of one size."
        )
    for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        if images[0] != labels[0]:
            raise DataError(
                f"{source_dir}: {images[0]} {split} images but {labels[0]} labels: the files do "
                "not belong together."
            )


def idx_digest(source_dir: Path) -> str:
    """sha256 of the four IDX files' bytes, in a fixed order: what a prepared copy is keyed by."""
    digest = hashlib.sha256()
    for path in idx_paths(source_dir):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class IdxConfig(tfds.core.BuilderConfig):
    """One directory of IDX files, named by its dataset name and the digest of its files."""

    source_dir: str = ""
    digest: str = ""  # idx_digest(source_dir)


class IdxImages(tfds.core.GeneratorBasedBuilder):
    """Prepares the four MNIST-format IDX files of a directory, in their original order; the
    image shape and the classes are the files' own."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        source = Path(c.source_dir)
        _, height, width = idx_shape(find_idx_file(source, IDX_FILES["train"][0]))
        labels = [read_idx(find_idx_file(source, stem)) for _, stem in IDX_FILES.values()]
        classes = int(max(int(x.max()) for x in labels)) + 1
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"IDX files from {c.source_dir} (sha256 of the four files: {c.digest})",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(height, width, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=classes),
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
    images, labels = (read_idx(find_idx_file(source_dir, stem)) for stem in IDX_FILES[split])
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


class Dataset(NamedTuple):
    train: Split
    test: Split
    source: str  # what it was prepared from: "idx sha256:<digest>", "image_folder sha256:<digest>"
    # or "tfds <name>"
    class_names: list[str]  # the label feature's (the indices where the data names none)


@contextlib.contextmanager
def preparation_lock(data_dir: Path, name: str) -> Iterator[None]:
    """One process at a time prepares dataset `name` in `data_dir` (the jobs of a parallel
    sweep, the processes of a distributed run); the others wait, then read what it wrote."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = (data_dir / f".{name}.lock").open("w")
    except OSError as e:
        raise DataError(
            f"The dataset {name} is not prepared in {data_dir}, and it cannot be prepared there "
            f"({e.strerror}): set dataset.data_dir (or TFDS_DATA_DIR) to a writable directory."
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _prepared(builder: type, config: tfds.core.BuilderConfig, splits, data_dir: Path) -> list:
    """The data sources of `splits` of `builder` with `config`, prepared first when they are not
    (one process at a time); a read-only data directory that holds them works too."""
    name = tfds.core.naming.camelcase_to_snakecase(builder.__name__)
    kw = {
        "data_dir": str(data_dir),
        "builder_kwargs": {"config": config, "file_format": "array_record"},
    }
    prepared = data_dir / name / config.name / str(builder.VERSION) / "dataset_info.json"
    if prepared.is_file():
        return [tfds.data_source(name, split=split, **kw) for split in splits]
    with preparation_lock(data_dir, f"{name}-{config.name}"):
        return [tfds.data_source(name, split=split, **kw) for split in splits]


def _idx_source(
    name: str, splits: tuple[str, str], data_dir: Path, source_dir: Path, apt_package: str | None
) -> tuple[list, str]:
    """The TFDS data sources of IDX files, prepared first (once per content: another source
    under the same name is prepared anew, beside the first), and their digest."""
    if any(p is None for p in idx_paths(source_dir)):
        raise DataError(missing_idx_message(name, str(source_dir), apt_package))
    check_idx_files(source_dir)
    digest = idx_digest(source_dir)
    config = IdxConfig(name=f"{name}_{digest[:16]}", source_dir=str(source_dir), digest=digest)
    return _prepared(IdxImages, config, splits, data_dir), digest


def _folder_source(
    name: str, splits: tuple[str, str], data_dir: Path, source_dir: Path, settings: dict
) -> tuple[list, str]:
    """The TFDS data sources of an image folder, prepared first (once per content and
    `settings`: image_size, channels, test_fraction, split_seed), and their digest."""
    files = folders.plan(source_dir, settings["test_fraction"], settings["split_seed"])
    if files.ignored:
        log.info("%s: %d files that are not %s images are ignored", source_dir, files.ignored,
                 "/".join(s[1:].upper() for s in folders.SUFFIXES))  # fmt: skip
    digest = folders.digest(source_dir, files, settings)
    config = folders.FolderConfig(
        name=f"{name}_{digest[:16]}", source_dir=str(source_dir), digest=digest, **settings
    )
    return _prepared(folders.FolderImages, config, splits, data_dir), digest


def _tfds_source(name: str, splits: tuple[str, str], data_dir: Path) -> list:
    """The data sources of a TFDS dataset prepared in `data_dir` (nothing is downloaded)."""
    try:
        return [
            tfds.data_source(name, split=s, data_dir=str(data_dir), download=False) for s in splits
        ]
    except Exception as e:  # TFDS raises several types for "not prepared here"
        raise DataError(
            f"Dataset '{name}' ({', '.join(splits)}) is not prepared in {data_dir} as "
            f"array_record: {e} Prepare it where TFDS can download (`tfds build {name} "
            f"--file_format=array_record --data_dir {data_dir}`), or set dataset.source_dir "
            "to a directory of IDX files."
        ) from None


def load(
    name: str,
    data_dir: str,
    source_dir: str | None = None,
    splits: tuple[str, str] = ("train", "test"),
    apt_package: str | None = None,
    folder: dict | None = None,
) -> Dataset:
    """The train and test splits as uint8 NHWC images and int32 labels, read with
    `tfds.data_source`.

    With `source_dir`, the files there are prepared first (once for their content) as
    `idx_images/<name>_<digest>` (IDX files) or, given the `folder` settings (image_size,
    channels, test_fraction, split_seed), `folder_images/<name>_<digest>` (an image folder);
    without it, `name` is a TFDS dataset already prepared in `data_dir` (array_record).
    """
    data_dir = Path(os.path.expanduser(data_dir))
    if source_dir and folder is not None:
        sources, digest = _folder_source(name, splits, data_dir, Path(source_dir), folder)
        origin = f"image_folder sha256:{digest}"
    elif source_dir:
        sources, digest = _idx_source(name, splits, data_dir, Path(source_dir), apt_package)
        origin = f"idx sha256:{digest}"
    else:
        sources, origin = _tfds_source(name, splits, data_dir), f"tfds {name}"
    train, test = (_arrays(source) for source in sources)
    names = list(sources[0].dataset_info.features["label"].names)
    return Dataset(train, test, origin, names)


def _arrays(source) -> Split:
    records = source.__getitems__(range(len(source)))
    if not records:
        return Split(np.zeros((0, *source.dataset_info.features["image"].shape), np.uint8),
                     np.zeros((0,), np.int32))  # fmt: skip
    images = np.stack([r["image"] for r in records]).astype(np.uint8)
    labels = np.array([r["label"] for r in records], dtype=np.int32)
    files = None
    if "file" in records[0]:
        files = np.array([_text(r["file"]) for r in records])
    return Split(images, labels, files)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_fits(split: Split, what: str, image_size: int, channels: int, num_classes: int) -> None:
    """DataError when the images or labels of `split` are not what the dataset config says."""
    _, h, w, c = split.images_NxHxWxC.shape
    if (h, w, c) != (image_size, image_size, channels):
        raise DataError(
            f"The {what} images are {h}x{w}x{c}, but the dataset config says "
            f"dataset.image_size={image_size} and dataset.channels={channels}: set those to the "
            "images' (the model's input_size is where they are resized to)."
        )
    largest = int(split.labels_N.max()) if len(split.labels_N) else -1
    if largest >= num_classes:
        raise DataError(
            f"The {what} labels go up to {largest}, but dataset.num_classes={num_classes} (labels "
            f"0 to {num_classes - 1}): set dataset.num_classes={largest + 1} (or more)."
        )
