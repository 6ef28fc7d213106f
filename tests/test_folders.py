"""Image folders: how files are found, split and decoded, and what a bad folder is told."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnjax import data, folders
from cnnjax.errors import DataError


def image(path: Path, array: np.ndarray, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save)
    return path


def grey(value: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.full((h, w), value, np.uint8)


def test_decode_crops_the_centre_square_and_converts_channels(tmp_path):
    picture = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    wide = np.zeros((8, 14), np.uint8)
    wide[:, 3:11] = picture  # 3 columns of black on each side
    out = folders.decode(image(tmp_path / "wide.png", wide), 8, 1)
    np.testing.assert_array_equal(out[..., 0], picture)  # the centre square, untouched
    rgb = folders.decode(image(tmp_path / "wide.png", wide), 8, 3)
    assert rgb.shape == (8, 8, 3) and (rgb == out).all()  # grey repeated in RGB
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 255  # pure red: ITU-R 601 luma 299/1000 of it
    assert folders.decode(image(tmp_path / "red.bmp", colour), 4, 1)[0, 0, 0] == 76
    half = folders.decode(image(tmp_path / "big.png", grey(200, 16, 16)), 8, 1)
    assert half.shape == (8, 8, 1) and (half == 200).all()
    palette = Image.fromarray(grey(90)).convert("P")
    palette.save(tmp_path / "p.gif")
    assert (folders.decode(tmp_path / "p.gif", 8, 3) == 90).all()


def test_decode_turns_photos_upright(tmp_path):
    stored = np.zeros((8, 8), np.uint8)
    stored[:, :2] = 255  # a bright left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif.tobytes())
    upright = folders.decode(tmp_path / "r.png", 8, 1)[..., 0]
    assert upright[:2].min() > 200 and upright[2:].max() < 50  # the edge is now on top


def test_unreadable_files_raise_what_the_builder_skips(tmp_path):
    (tmp_path / "x.png").write_bytes(b"no image here")
    with pytest.raises(folders.UNREADABLE):
        folders.decode(tmp_path / "x.png", 8, 1)


def test_a_seeded_split_per_class(tmp_path):
    for k in range(10):
        image(tmp_path / "a" / f"{k}.png", grey(k))
        image(tmp_path / "b" / "deep" / f"{k}.JPG", grey(k), quality=90)
    (tmp_path / "a" / "readme.txt").write_text("not an image")
    plan = folders.plan(tmp_path, 0.3, seed=0)
    assert plan.classes == ["a", "b"] and plan.ignored == 1
    assert [label for _, label in plan.splits["test"]] == [0, 0, 0, 1, 1, 1]
    assert len(plan.splits["train"]) == 14
    assert folders.plan(tmp_path, 0.3, seed=0) == plan
    assert folders.plan(tmp_path, 0.3, seed=1).splits["test"] != plan.splits["test"]
    assert all(f.startswith("b/deep/") for f, label in plan.splits["train"] if label == 1)


def test_train_and_test_folders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for k in range(n):
                image(tmp_path / split / cls / f"{k}.png", grey(k))
    plan = folders.plan(tmp_path, 0.5, seed=0)  # test_fraction unused
    assert plan.classes == ["cat", "dog"]
    assert plan.splits["test"] == [(f"test/{c}/{k}.png", i) for i, c in enumerate(["cat", "dog"])
                                   for k in range(2)]  # fmt: skip
    assert len(plan.splits["train"]) == 6
    image(tmp_path / "test" / "emu" / "0.png", grey(1))
    with pytest.raises(DataError, match=r"has class folders that .* lacks: \['emu'\]"):
        folders.plan(tmp_path, 0.5, seed=0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: image(root / "only" / "0.png", grey(0)), r"holds 1 class folder"),
        (lambda root: [image(root / "a" / "0.png", grey(0)), (root / "b").mkdir()],
         "'b' of .* has no training images"),
        (lambda root: [image(root / c / "0.png", grey(0)) for c in "ab"], "test split is empty"),
    ],
)  # fmt: skip
def test_a_folder_that_cannot_work_is_named(tmp_path, make, message):
    root = tmp_path / "photos"
    if make(root) is not None:
        root.mkdir(exist_ok=True)
    with pytest.raises(DataError, match=message):
        folders.plan(root, 0.2, seed=0)


def test_split_folders_under_other_names_are_refused(tmp_path):
    for split in ("Train", "val"):
        for cls in ("cat", "dog"):
            image(tmp_path / split / cls / "0.png", grey(0))
    with pytest.raises(DataError, match=r"\['Train', 'val'\], which look like splits"):
        folders.plan(tmp_path, 0.5, seed=0)


def test_a_split_of_unreadable_files_is_refused(tmp_path):
    for cls in ("a", "b"):
        for k in range(3):
            (tmp_path / "photos" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "photos" / cls / f"{k}.jpg").write_bytes(b"not a jpeg")
    settings = {"image_size": 8, "channels": 1, "test_fraction": 0.3, "split_seed": 0}
    with pytest.raises(DataError, match="none of the 4 train files can be read as an image"):
        data.load("bad", str(tmp_path / "tfds"), str(tmp_path / "photos"), folder=settings)


def test_the_digest_follows_content_and_settings(tmp_path):
    for k in range(2):
        image(tmp_path / "a" / f"{k}.png", grey(1))
        image(tmp_path / "b" / f"{k}.png", grey(2))
    plan = folders.plan(tmp_path, 0.5, seed=0)
    settings = {"image_size": 8, "channels": 1}
    first = folders.digest(tmp_path, plan, settings)
    assert folders.digest(tmp_path, plan, settings) == first
    assert folders.digest(tmp_path, plan, settings | {"channels": 3}) != first
    image(tmp_path / "a" / "0.png", grey(3))  # same name and size, other pixels
    assert folders.digest(tmp_path, plan, settings) != first
