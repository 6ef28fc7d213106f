"""Input adaptation, augmentation, epoch order and batches."""

import jax
import numpy as np
import pytest

from cnnjax import batches
from cnnjax.data import DataError, Split


@pytest.mark.parametrize(
    "src, dst, words",
    [
        ((28, 28, 1), (28, 28, 1), "none"),
        ((28, 28, 1), (32, 32, 1), "resize 28x28 -> 32x32"),
        ((28, 28, 1), (227, 227, 3), "repeat 1 channel -> 3"),
        ((32, 32, 3), (28, 28, 1), "average 3 channels -> 1"),
    ],
)
def test_preprocess_shapes_and_words(src, dst, words):
    fn, description = batches.make_preprocess(src, dst, [0.5] * src[2], [0.25] * src[2])
    assert words in description
    x = np.full((2, *src), 255, np.uint8)
    y = jax.jit(fn)(x)
    assert y.shape == (2, *dst) and y.dtype == np.float32
    np.testing.assert_allclose(np.asarray(y), (1.0 - 0.5) / 0.25, rtol=1e-5)


def test_preprocess_normalises_per_channel():
    fn, _ = batches.make_preprocess((2, 2, 3), (2, 2, 3), [0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    y = np.asarray(fn(np.zeros((1, 2, 2, 3), np.uint8)))
    np.testing.assert_allclose(y[0, 0, 0], [-0.2, -0.4, -0.6], rtol=1e-6)


def test_incompatible_channels_are_refused():
    with pytest.raises(DataError, match="Cannot adapt 3 channels to 4"):
        batches.make_preprocess((8, 8, 3), (8, 8, 4), [0.0], [1.0])


def test_epoch_batches_visit_each_example_once():
    order = list(batches.epoch_batches(103, 10, np.random.default_rng(0)))
    assert len(order) == 10 and all(len(b) == 10 for b in order)
    seen = np.concatenate(order)
    assert len(np.unique(seen)) == 100


def _plan(*args) -> list[tuple[int, list[list[int]]]]:
    return [(epoch, [b.tolist() for b in idx]) for epoch, idx in batches.epoch_plan(*args)]


def test_the_epoch_plan_resumes_mid_epoch_on_the_same_batches():
    full = _plan(0, 50, 10, 12)  # seed 0, 50 examples, batch 10: 5 steps an epoch, 12 steps
    assert [(epoch, len(b)) for epoch, b in full] == [(1, 5), (2, 5), (3, 2)]
    epoch_2 = batches.epoch_batches(50, 10, batches.epoch_order(0, 2))
    assert full[1][1] == [b.tolist() for b in epoch_2]
    resumed = _plan(0, 50, 10, 12, 7)  # from step 7: 3 more in epoch 2, then epoch 3
    assert resumed == [(2, full[1][1][2:]), (3, full[2][1])]
    assert _plan(0, 50, 10, 12, 12) == [(3, [])]  # resumed at the end: nothing left
    assert _plan(1, 50, 10, 5)[0][1] != full[0][1]  # another seed, another order


def test_eval_batches_cover_everything_once_with_a_mask():
    split = Split(np.arange(25, dtype=np.uint8).reshape(25, 1, 1, 1), np.arange(25))
    evals = list(batches.eval_batches(split, 10))
    assert [int(b["mask"].sum()) for b in evals] == [10, 10, 5]
    kept = np.concatenate([b["label"][b["mask"] > 0] for b in evals])
    np.testing.assert_array_equal(kept, np.arange(25))


def test_augment_crops_and_flips_on_device():
    assert batches.make_augment() is None
    images = np.zeros((64, 8, 8, 1), np.uint8)
    images[:, 3, 2] = 255  # one bright pixel at (3, 2)
    flipped = np.asarray(batches.make_augment(flip=True)(images, jax.random.key(0)))
    cols = {int(np.argwhere(im[..., 0])[0][1]) for im in flipped}
    assert cols == {2, 5}  # mirrored to 8 - 1 - 2 = 5 about half the time
    cropped = np.asarray(batches.make_augment(crop_padding=2)(images, jax.random.key(0)))
    assert cropped.shape == images.shape and cropped.dtype == np.uint8
    positions = {tuple(np.argwhere(im[..., 0])[0]) for im in cropped if im.any()}
    assert len(positions) > 5  # shifted by up to 2 pixels each way
    assert all(abs(r - 3) <= 2 and abs(c - 2) <= 2 for r, c in positions)
    again = np.asarray(batches.make_augment(crop_padding=2)(images, jax.random.key(0)))
    np.testing.assert_array_equal(cropped, again)  # a function of the rng
