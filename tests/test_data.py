"""The IDX builder through TFDS, the missing-data error, the real Fashion-MNIST files."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_idx_dataset, write_idx

from cnnjax import data


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_through_tfds(tmp_path, gz):
    arrays = make_idx_dataset(tmp_path / "src", 300, 70, gz=gz, seed=3)
    loaded = data.load("toy", str(tmp_path / "tfds"), str(tmp_path / "src"))
    digest = data.idx_digest(tmp_path / "src")
    assert loaded.source == f"idx sha256:{digest}"
    for got, stem in ((loaded.train, "train"), (loaded.test, "t10k")):
        images, labels = arrays[stem]
        assert got.images_NxHxWxC.shape == (len(labels), 28, 28, 1)
        assert got.images_NxHxWxC.dtype == np.uint8
        np.testing.assert_array_equal(got.images_NxHxWxC[..., 0], images)  # same order too
        np.testing.assert_array_equal(got.labels_N, labels)
    prepared = tmp_path / "tfds" / "idx_images" / f"toy_{digest[:16]}" / "1.0.0"
    assert sorted(p.name.split(".")[0] for p in prepared.glob("*.array_record*")) == [
        "idx_images-test",
        "idx_images-train",
    ]
    assert digest in json.loads((prepared / "dataset_info.json").read_text())["description"]


def test_processes_preparing_one_dataset_at_once_all_get_it(tmp_path):
    """The jobs of a parallel sweep (or the processes of a distributed run) on a fresh data dir:
    one prepares, the others wait for it instead of failing on its half-written directory."""
    arrays = make_idx_dataset(tmp_path / "src", 3000, 10, seed=4)
    load = (
        "import sys; from cnnjax import data; "
        "s = data.load('toy', sys.argv[1], sys.argv[2]).train; "
        "print(int(s.images_NxHxWxC.sum()), int(s.labels_N.sum()))"
    )
    args = [sys.executable, "-c", load, str(tmp_path / "tfds"), str(tmp_path / "src")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0].splitlines()[-1].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    images, labels = arrays["train"]
    assert outputs == [[str(int(images.sum())), str(int(labels.sum()))]] * 3


def test_read_idx_matches_header(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x-idx3-ubyte", images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x-idx3-ubyte.gz"), images)


def test_truncated_and_foreign_files_are_named(tmp_path):
    write_idx(tmp_path / "t", np.zeros((4, 5, 5), np.uint8), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "t").read_bytes()[:-7])
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "png.gz").write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(20)))
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(tmp_path / "png.gz")


def test_missing_files_name_the_package_and_the_alternative(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load(
            "fashion_mnist",
            str(tmp_path / "tfds"),
            str(tmp_path / "empty"),
            apt_package="dataset-fashion-mnist",
        )
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "empty") in msg
    assert "dataset.source_dir" in msg and "tfds build fashion_mnist" in msg
    assert not (tmp_path / "tfds").exists()  # nothing half-prepared is left behind


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(data.DataError, match="tfds build cifar10 --file_format=array_record"):
        data.load("cifar10", str(tmp_path))


FASHION = "/usr/share/datasets/fashion-mnist"


def test_real_fashion_mnist_equals_the_idx_files():
    """The Debian files (`make test` installs dataset-fashion-mnist) through the TFDS builder:
    same sizes, labels, pixels and statistics."""
    session = os.environ["TFDS_DATA_DIR"]  # prepared once for the session's tests
    train, test, _, names = data.load("fashion_mnist", session, FASHION)
    assert names == [str(k) for k in range(10)]  # the files name none: the config does
    assert (len(train.labels_N), len(test.labels_N)) == (60_000, 10_000)
    assert train.labels_N[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    raw = gzip.decompress((Path(FASHION) / "t10k-images-idx3-ubyte.gz").read_bytes())
    np.testing.assert_array_equal(test.images_NxHxWxC.ravel(), np.frombuffer(raw[16:], np.uint8))
    assert train.images_NxHxWxC.mean() / 255 == pytest.approx(0.2860, abs=1e-4)  # dataset config
    assert np.bincount(test.labels_N).tolist() == [1000] * 10
