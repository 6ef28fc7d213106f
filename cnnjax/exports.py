"""A trained run's forward pass (`trained.forward`: uint8 images -> logits, weights inside) as a
file other programs run: `jax.export`'s serialized StableHLO, or ONNX through jax2onnx (the
`onnx` extra). Each file is read back and run on test images before it is reported, and its
largest difference from JAX's logits is recorded beside it."""

import contextlib
import io
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from cnnjax.errors import CnnjaxError, ConfigError


class ExportError(CnnjaxError):
    """A model the chosen format's converter or runtime cannot handle."""


FORMATS = {"stablehlo": "model.stablehlo", "onnx": "model.onnx"}  # format -> file name
PLATFORMS = ("cpu", "cuda", "tpu")  # the StableHLO program is lowered for each
TOLERANCE = 1e-4  # the largest logit difference from JAX accepted, relative to the largest logit
ONNX_MISSING = (
    "format=onnx needs the onnx extra: pip install -e '.[onnx]' (jax2onnx, onnx, onnxruntime)"
)
LOADERS = {
    "stablehlo": (
        "from jax import export; f = export.deserialize(open(path, 'rb').read()); "
        "logits = f.call(images_uint8)"
    ),
    "onnx": (
        "import onnxruntime as ort; s = ort.InferenceSession(path); "
        "logits = s.run(None, {s.get_inputs()[0].name: images_uint8})[0]"
    ),
}


def stablehlo(fn: Callable, image_hwc: tuple[int, ...]) -> bytes:
    """`fn` serialized by `jax.export` for a batch of any size, for CPU, CUDA and TPU."""
    (batch,) = export.symbolic_shape("b")
    images = jax.ShapeDtypeStruct((batch, *image_hwc), jnp.uint8)
    return bytes(export.export(jax.jit(fn), platforms=PLATFORMS)(images).serialize())


def run_stablehlo(path: Path, images_NxHxWxC: np.ndarray) -> np.ndarray:
    """The logits a serialized StableHLO file computes (no model code needed)."""
    return np.asarray(export.deserialize(bytearray(path.read_bytes())).call(images_NxHxWxC))


def onnx(fn: Callable, image_hwc: tuple[int, ...]) -> bytes:
    """`fn` converted by jax2onnx, for a batch of any size (its first input dimension "B").
    The converter's chatter (prints, plugins for libraries this project does not use) is
    silenced."""
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise ConfigError(ONNX_MISSING) from None
    images = jax.ShapeDtypeStruct(("B", *image_hwc), jnp.uint8)
    with contextlib.redirect_stdout(io.StringIO()), _quiet("jax2onnx", "onnx_ir"):
        model = to_onnx(fn, [images], return_mode="proto")
    del model.graph.value_info[:]  # its shape hints of inner tensors can be wrong: let the
    return model.SerializeToString()  # runtime infer them


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only errors from the loggers `names` while inside."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def run_onnx(path: Path, images_NxHxWxC: np.ndarray) -> np.ndarray:
    """The logits onnxruntime computes with an ONNX file."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(ONNX_MISSING) from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: not its shape-merging notes
    session = onnxruntime.InferenceSession(str(path), options, ["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images_NxHxWxC})[0]


WRITERS = {"stablehlo": (stablehlo, run_stablehlo), "onnx": (onnx, run_onnx)}


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}")


def write(
    fn: Callable, images_NxHxWxC: np.ndarray, fmt: str, out_dir: Path, about: dict
) -> tuple[Path, dict]:
    """`fn` written as `fmt` into `out_dir`, read back and run on `images_NxHxWxC` beside JAX;
    its description (`about`, the input, the output, how to load it and the check) goes into
    the file's name + ".json". Returns the file and the description."""
    check_format(fmt)
    convert, run = WRITERS[fmt]
    image_hwc = tuple(images_NxHxWxC.shape[1:])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FORMATS[fmt]
    written = path.with_name(path.name + ".tmp")  # replaces `path` once it passed the check
    try:
        written.write_bytes(convert(fn, image_hwc))
        got = run(written, images_NxHxWxC)
    except ConfigError:
        raise
    except Exception as e:  # the converter or the runtime cannot handle this model
        written.unlink(missing_ok=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"format={fmt} cannot export this model: {type(e).__name__}: {first[:300]}. Nothing "
            "was written; format=stablehlo exports every model (HYDRA_FULL_ERROR=1: traceback)."
        ) from e
    expected = np.asarray(jax.jit(fn)(images_NxHxWxC))
    same_shape = got.shape == expected.shape
    difference = float(np.abs(got - expected).max()) if same_shape else math.inf
    if not difference <= TOLERANCE * max(1.0, float(np.abs(expected).max())):  # NaN too
        written.unlink()
        wrong = f"up to {difference:.3g} away from" if same_shape else f"of shape {got.shape}, not"
        raise ExportError(
            f"format={fmt}: the converted model computes logits {wrong} JAX's on "
            f"{len(images_NxHxWxC)} test images (the converter mis-converts a layer of this "
            "model). Nothing was written; format=stablehlo exports every model."
        )
    written.replace(path)
    description = about | {
        "format": fmt,
        "file": path.name,
        "bytes": path.stat().st_size,
        "input": {"shape": ["batch", *image_hwc], "dtype": "uint8", "layout": "NHWC, 0-255"},
        "output": {
            "shape": ["batch", int(expected.shape[-1])],
            "dtype": "float32",
            "meaning": "logits (softmax gives the class probabilities)",
        },
        "load": LOADERS[fmt],
        "check": {
            "images": len(images_NxHxWxC),
            "max_abs_diff_from_jax": difference,
            "same_top_class": bool((got.argmax(-1) == expected.argmax(-1)).all()),
        },
    }
    text = json.dumps(description, indent=2) + "\n"
    _replace(path.with_name(path.name + ".json"), text.encode())
    return path, description


def _replace(path: Path, content: bytes) -> None:
    """Write `path` whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)
