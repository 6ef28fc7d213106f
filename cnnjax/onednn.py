"""The convolution every `layers.conv` calls: XLA's, or oneDNN's on the CPU.

XLA:CPU runs small-channel convolutions, and above all their gradients, several times slower
than oneDNN's direct kernels (the ones PyTorch uses). `cnnjax/_onednn.so` (built by `make`
from `csrc/onednn_conv.cc`, needs Debian's `libdnnl-dev`) exposes oneDNN's forward,
backward-data and backward-weights convolutions as XLA FFI custom calls; `conv_general_dilated`
uses them, with a custom VJP, inside `with backend("onednn")` (or "auto" on a CPU, when the
library is built) for float32 NHWC convolutions without input dilation or groups, and XLA's
everywhere else. Tracing outside such a block (analysis, cost checks) always gets XLA's.
"""

import contextlib
import contextvars
import ctypes
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.geometry import conv_output_size

LIBRARY = Path(__file__).with_name("_onednn.so")
BACKENDS = ("xla", "onednn", "auto")
BUILD_HINT = "build it with `make onednn` (needs `apt-get install libdnnl-dev`)"
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # NHWC, HWIO, NHWC
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("conv_backend", default="xla")


@functools.cache
def available() -> bool:
    """True when the library is built; registers its three custom calls on first use."""
    if not LIBRARY.exists():
        return False
    lib = ctypes.cdll.LoadLibrary(str(LIBRARY))
    for name in ("forward", "backward_data", "backward_weights"):
        target = f"cnnjax_conv_{name}"
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), "cpu")
    return True


def resolve(name: str) -> str:
    """ "xla" or "onednn" for a configured backend name; "auto" means oneDNN on a CPU when the
    library is built. Asking for "onednn" without the library is an error naming the fix."""
    if name not in BACKENDS:
        raise ValueError(f"unknown convolution backend {name!r}; choose one of {BACKENDS}")
    on_cpu = jax.default_backend() == "cpu"
    if name == "onednn" and not (on_cpu and available()):
        why = "runs on the CPU only" if not on_cpu else f"is not built ({LIBRARY}); {BUILD_HINT}"
        raise RuntimeError(f"the oneDNN convolution {why}")
    if name == "auto":
        return "onednn" if on_cpu and available() else "xla"
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Convolutions traced inside use backend `name` (see `resolve`); yields the one chosen."""
    chosen = resolve(name)
    token = _backend.set(chosen)
    try:
        yield chosen
    finally:
        _backend.reset(token)


def conv_general_dilated(
    lhs: jnp.ndarray,
    rhs: jnp.ndarray,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    **kw,
) -> jnp.ndarray:
    """`lax.conv_general_dilated`'s signature (what `flax.linen.Conv` calls)."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    fast = (
        _backend.get() == "onednn"
        and not kw
        and lhs.ndim == 4
        and lhs.dtype == rhs.dtype == jnp.float32
        and feature_group_count == 1
        and all(d == 1 for d in lhs_dilation or (1, 1))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
    )
    if not fast:
        return lax.conv_general_dilated(
            *args, feature_group_count=feature_group_count, precision=precision, **kw
        )
    kernel_hw = rhs.shape[:2]
    dilation = tuple(rhs_dilation or (1, 1))
    if isinstance(padding, str):
        span = [d * (k - 1) + 1 for k, d in zip(kernel_hw, dilation, strict=True)]
        padding = lax.padtype_to_pads(lhs.shape[1:3], span, window_strides, padding)
    n, h, w, c = lhs.shape
    geometry = (
        n,
        c,
        h,
        w,
        rhs.shape[3],
        *kernel_hw,
        *window_strides,
        *(lo for lo, _ in padding),
        *(hi for _, hi in padding),
        *dilation,
    )
    return _conv(lhs, rhs, tuple(int(g) for g in geometry))


def _call(target: str, shape: tuple[int, ...], a: jnp.ndarray, b: jnp.ndarray, geometry):
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    call = jax.ffi.ffi_call(f"cnnjax_conv_{target}", out, vmap_method="sequential")
    return call(a, b, geometry=np.asarray(geometry, np.int64))


def _output_shape(geometry: tuple[int, ...]) -> tuple[int, ...]:
    n, _, h, w, o, kh, kw, sh, sw, plh, plw, phh, phw, dh, dw = geometry
    oh = conv_output_size(h, kh, sh, (plh, phh), dh)
    return (n, oh, conv_output_size(w, kw, sw, (plw, phw), dw), o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jnp.ndarray, w: jnp.ndarray, geometry: tuple[int, ...]) -> jnp.ndarray:
    return _call("forward", _output_shape(geometry), x, w, geometry)


def _conv_fwd(x, w, geometry):
    return _conv(x, w, geometry), (x, w)


def _conv_bwd(geometry, residuals, dy):
    x, w = residuals
    dx = _call("backward_data", x.shape, dy, w, geometry)
    dw = _call("backward_weights", w.shape, x, dy, geometry)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)
