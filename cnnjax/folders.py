"""Folders of image files: one sub-folder per class, either directly in the source folder (split
into train and test by a seeded draw per class) or under its `train/` and `test/`.

PNG, JPEG, BMP and GIF files of any size and mode are decoded with Pillow the one way
`decode` does: turned upright (EXIF), converted to the channels asked for, cropped to the
largest centred square and resized to `image_size` (bilinear, antialiased). The `FolderImages`
TFDS builder prepares them once for their content and these settings; files Pillow cannot read
are skipped, and the preparation names how many and the first few.
"""

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnjax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")  # compared lower-case
SPLITS = ("train", "test")
SPLIT_NAMES = {"train", "test", "training", "testing", "val", "valid", "validation"}
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


class Plan(NamedTuple):
    """What a folder holds: the class names (sorted) and each split's files, as paths relative
    to the folder with their label, sorted by class, then path."""

    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    ignored: int  # files that are not images (by suffix)


def _folders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def has_split_folders(source_dir: Path) -> bool:
    """True when the classes are under `train/` and `test/`."""
    return all((source_dir / s).is_dir() for s in SPLITS)


def class_names(source_dir: Path) -> list[str]:
    """The class folders' names, sorted (those of `train/` when the folder is split)."""
    if not source_dir.is_dir():
        problem = "is not a folder" if source_dir.exists() else "does not exist"
        raise DataError(
            f"dataset.source_dir={source_dir} {problem}: give the folder that holds one sub-folder "
            "of images per class (or train/ and test/ with those sub-folders)."
        )
    root = source_dir / "train" if has_split_folders(source_dir) else source_dir
    classes = _folders(root)
    if root == source_dir and (splits := [c for c in classes if c.lower() in SPLIT_NAMES]):
        raise DataError(
            f"{source_dir} has the folders {splits}, which look like splits, not classes: name "
            "the two splits train/ and test/ (each holding one folder per class), or put the "
            "class folders directly in it."
        )
    if len(classes) < 2:
        raise DataError(
            f"{root} holds {len(classes)} class folder(s) ({classes}): an image folder needs one "
            "sub-folder per class, at least two, each holding that class's images."
        )
    return classes


def count_classes(source_dir: str | None) -> int | None:
    """The number of class folders in `source_dir` (None without one): the image folder config's
    `num_classes`, through the `cnnjax.classes` resolver."""
    return len(class_names(Path(source_dir).expanduser())) if source_dir else None


def _images(folder: Path) -> tuple[list[Path], int]:
    """The image files under `folder` (any depth, sorted) and how many other files there are."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in SUFFIXES]
    return images, len(files) - len(images)


def image_paths(images: str | list | None) -> list[Path]:
    """The files `images` names (`~` expanded): a file, a folder (its image files at any depth,
    sorted) or a list of them."""
    if not images:
        raise ConfigError("images=null: name image files or folders, e.g. images=photo.jpg")
    entries = [images] if isinstance(images, str | Path) else list(images)
    paths = []
    for entry in (Path(str(e)).expanduser() for e in entries):
        if entry.is_dir():
            paths += _images(entry)[0]
        elif entry.is_file():
            paths.append(entry)
        else:
            raise DataError(f"images: {entry} does not exist; name image files or folders")
    if not paths:
        raise DataError(f"images={entries}: no image files ({', '.join(SUFFIXES)}) there")
    return paths


def plan(source_dir: Path, test_fraction: float, seed: int) -> Plan:
    """The classes and the files of each split; without train/ and test/, round(n *
    test_fraction) of each class's n files (but never all), drawn with `seed`, are the test
    split."""
    classes = class_names(source_dir)
    splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    ignored = 0
    split_folders = has_split_folders(source_dir)
    if split_folders and (extra := sorted(set(_folders(source_dir / "test")) - set(classes))):
        raise DataError(
            f"{source_dir / 'test'} has class folders that {source_dir / 'train'} lacks: "
            f"{extra}. The test classes must be training classes; add their training images or "
            "remove them."
        )
    for label, name in enumerate(classes):
        found = {}
        for s in SPLITS if split_folders else ("all",):
            folder = source_dir / s / name if split_folders else source_dir / name
            found[s], other = _images(folder) if folder.is_dir() else ([], 0)
            ignored += other
        if split_folders:
            parts = found
        else:
            files = found["all"]
            order = np.random.default_rng([seed, label]).permutation(len(files))
            n_test = min(round(len(files) * test_fraction), len(files) - 1)
            parts = {
                "test": sorted(files[i] for i in order[:n_test]),
                "train": sorted(files[i] for i in order[n_test:]),
            }
        if not parts["train"]:
            raise DataError(
                f"The class folder {name!r} of {source_dir} has no training images (files ending "
                f"in {', '.join(SUFFIXES)}): add some, or remove the folder."
            )
        for s in SPLITS:
            splits[s] += [(str(p.relative_to(source_dir)), label) for p in parts[s]]
    if not splits["test"]:
        raise DataError(
            f"{source_dir}: the test split is empty (dataset.test_fraction={test_fraction}): "
            "raise test_fraction, or put test images under test/<class>/."
        )
    return Plan(classes, splits, ignored)


def digest(source_dir: Path, folder_plan: Plan, settings: dict) -> str:
    """sha256 of the settings, the split files' paths, labels and bytes: what a prepared copy
    is keyed by."""
    h = hashlib.sha256(repr(sorted(settings.items())).encode())
    for split, files in folder_plan.splits.items():
        for relative, label in files:
            h.update(f"\0{split}\0{relative}\0{label}\0".encode())
            try:
                with (source_dir / relative).open("rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            except OSError as e:  # unreadable: the preparation skips it
                h.update(f"\0unreadable: {e.strerror}".encode())
    return h.hexdigest()


def decode(path: Path, image_size: int, channels: int) -> np.ndarray:
    """An image file as uint8 (image_size, image_size, channels): upright, converted to grey
    (channels 1) or RGB (channels 3), the largest centred square resized (bilinear,
    antialiased). Raises one of UNREADABLE when Pillow cannot read it."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("L" if channels == 1 else "RGB")
    square = ImageOps.fit(image, (image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(square, np.uint8).reshape(image_size, image_size, channels)


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    """One image folder with the settings it is prepared with, named by its dataset name and the
    digest of both."""

    source_dir: str = ""
    image_size: int = 0
    channels: int = 0
    test_fraction: float = 0.0
    split_seed: int = 0
    digest: str = ""


class FolderImages(tfds.core.GeneratorBasedBuilder):
    """Prepares an image folder: each split's decoded images in the plan's order, their labels
    and their paths relative to the folder."""

    VERSION = tfds.core.Version("1.0.0")

    def _plan(self) -> Plan:
        c = self.builder_config
        return plan(Path(c.source_dir), c.test_fraction, c.split_seed)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images from {c.source_dir} (sha256 of files and settings: {c.digest})",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(c.image_size, c.image_size, c.channels), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=class_names(Path(c.source_dir))),
                    "file": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the plan's order
        )

    def _split_generators(self, dl_manager):
        files = self._plan().splits
        return {split: self._generate_examples(split, files[split]) for split in SPLITS}

    def _generate_examples(self, split: str, files: list[tuple[str, int]]):
        c = self.builder_config
        skipped = []
        for i, (relative, label) in enumerate(files):
            try:
                image = decode(Path(c.source_dir) / relative, c.image_size, c.channels)
            except UNREADABLE as e:
                skipped.append(f"{relative} ({e})")
                continue
            yield i, {"image": image, "label": label, "file": relative}
        if files and len(skipped) == len(files):
            raise DataError(
                f"{c.source_dir}: none of the {len(files)} {split} files can be read as an image "
                f"(first: {skipped[0]}): check the files' format and permissions."
            )
        if skipped:
            log.warning(
                "%s: skipped %d of the %d %s files, which cannot be read as images: %s",
                c.source_dir, len(skipped), len(files), split, "; ".join(skipped[:5])
                + ("; ..." if len(skipped) > 5 else ""),
            )  # fmt: skip
