"""What a step takes from a dataset: the in-graph adaptation of uint8 images to a model's input,
on-device augmentation, each epoch's order (a function of the seed and the epoch alone) and
the batches of training and evaluation."""

import itertools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data import DataError, Split


def make_preprocess(
    source_hwc: tuple[int, int, int],
    target_hwc: tuple[int, int, int],
    mean: list[float],
    std: list[float],
) -> tuple[Callable[[jnp.ndarray], jnp.ndarray], str]:
    """A jit-able uint8 -> float32 adaptation to the model's input, and what it does, in words.

    Scales to [0, 1], resizes (bilinear) and repeats a single channel (or averages to one) as
    needed, then normalises with the dataset's per-channel mean and std.
    """
    (sh, sw, sc), (th, tw, tc) = source_hwc, target_hwc
    if sc != tc and 1 not in (sc, tc):
        raise DataError(f"Cannot adapt {sc} channels to {tc}: only 1 <-> N conversions exist.")
    mean_c = np.resize(np.asarray(mean, np.float32), tc)
    std_c = np.resize(np.asarray(std, np.float32), tc)
    steps = []
    if (sh, sw) != (th, tw):
        steps.append(f"resize {sh}x{sw} -> {th}x{tw} (bilinear)")
    if sc == 1 and tc > 1:
        steps.append(f"repeat 1 channel -> {tc}")
    elif tc == 1 and sc > 1:
        steps.append(f"average {sc} channels -> 1")

    def preprocess(images_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
        x = images_BxHxWxC.astype(jnp.float32) / 255.0
        if (sh, sw) != (th, tw):
            x = jax.image.resize(x, (x.shape[0], th, tw, sc), "bilinear")
        if sc == 1 and tc > 1:
            x = jnp.repeat(x, tc, axis=-1)
        elif tc == 1 and sc > 1:
            x = x.mean(axis=-1, keepdims=True)
        return (x - mean_c) / std_c

    return preprocess, "; ".join(steps) or "none (the dataset already fits the model)"


def channel_stats(images_NxHxWxC: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """The per-channel mean and std of uint8 images scaled to [0, 1] (float64 sums, a chunk of
    images at a time)."""
    sums = np.zeros((2, images_NxHxWxC.shape[-1]))
    for start in range(0, len(images_NxHxWxC), chunk):
        x = images_NxHxWxC[start : start + chunk].astype(np.float64) / 255.0
        sums += [x.sum(axis=(0, 1, 2)), np.square(x).sum(axis=(0, 1, 2))]
    count = images_NxHxWxC.size / images_NxHxWxC.shape[-1]
    mean = sums[0] / count
    std = np.sqrt(np.maximum(sums[1] / count - mean**2, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def make_augment(crop_padding: int = 0, flip: bool = False) -> Callable | None:
    """On-device augmentation of a uint8 NHWC batch: a random crop of the image zero-padded by
    `crop_padding` on each side, and a random horizontal flip; None when both are off."""
    if not crop_padding and not flip:
        return None

    def augment(images_BxHxWxC: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
        b, h, w, c = images_BxHxWxC.shape
        crop_rng, flip_rng = jax.random.split(rng)
        x = images_BxHxWxC
        if crop_padding:
            p = crop_padding
            padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
            corners = jax.random.randint(crop_rng, (b, 2), 0, 2 * p + 1)

            def crop(img: jnp.ndarray, yx: jnp.ndarray) -> jnp.ndarray:
                return jax.lax.dynamic_slice(img, (yx[0], yx[1], 0), (h, w, c))

            x = jax.vmap(crop)(padded, corners)
        if flip:
            mirror = jax.random.bernoulli(flip_rng, 0.5, (b, 1, 1, 1))
            x = jnp.where(mirror, x[:, :, ::-1], x)
        return x

    return augment


def epoch_order(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's batch order: a function of the seed and the epoch alone."""
    return np.random.default_rng([seed, epoch])


def epoch_plan(
    seed: int, n_train: int, batch_size: int, total_steps: int, start_step: int = 0
) -> Iterator[tuple[int, Iterator[np.ndarray]]]:
    """Each epoch from the one holding `start_step` on, with its index batches still to train
    (the order depends on the seed and the epoch alone, so a resumed run trains on the same
    batches); the last epoch ends at `total_steps`."""
    per_epoch = n_train // batch_size
    for epoch in range(start_step // per_epoch + 1, math.ceil(total_steps / per_epoch) + 1):
        first = (epoch - 1) * per_epoch  # steps before this epoch
        done = max(start_step - first, 0)
        batches = epoch_batches(n_train, batch_size, epoch_order(seed, epoch), skip=done)
        yield epoch, itertools.islice(batches, max(min(per_epoch, total_steps - first) - done, 0))


def epoch_batches(
    n: int, batch_size: int, rng: np.random.Generator, skip: int = 0
) -> Iterator[np.ndarray]:
    """Shuffled index batches of one epoch, after the first `skip` (a resumed epoch); the
    incomplete last batch is dropped."""
    order = rng.permutation(n)
    for start in range(skip * batch_size, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in fixed-size batches; the last is padded and masked (mask 0)."""
    n = len(split.labels_N)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = idx < n
        idx = np.where(mask, idx, 0)
        yield {
            "image": split.images_NxHxWxC[idx],
            "label": split.labels_N[idx],
            "mask": mask.astype(np.float32),
        }
