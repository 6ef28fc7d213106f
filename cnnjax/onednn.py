"""The convolution every `layers.Conv` computes: XLA's, or oneDNN's on the CPU.

XLA:CPU runs small-channel convolutions, and above all their gradients, several times slower
than oneDNN's kernels (the ones PyTorch uses). `cnnjax/_onednn.so` (built by `make onednn`
from `csrc/onednn_conv.cc` against the `onednn` extra's oneDNN 3.2) exposes oneDNN's forward,
backward-data and backward-weights convolutions, bias included, as XLA FFI custom calls. `conv`
uses them, with a custom VJP, for float32 convolutions without groups inside a function wrapped by
`using("onednn", fn)`, and XLA's everywhere else.

The backend is an argument of the function that runs the model (the engine's steps take
`conv_backend`), fixed when that function is made: a function jitted for one backend is compiled
for it, and one for the other backend is another function, with its own compilation. Nothing
outside the wrapped call sees the choice, so code that never asks (the analysis, XLA's cost
checks) gets XLA's.
"""

import contextvars
import ctypes
import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.errors import ConfigError
from cnnjax.geometry import conv_output_size, resolve_padding

LIBRARY = Path(__file__).with_name("_onednn.so")
BACKENDS = ("xla", "onednn", "auto")
BUILD_HINT = "build it with `make onednn` (pip extra `onednn` and a C++ compiler)"
NHWC = ("NHWC", "HWIO", "NHWC")
_active: contextvars.ContextVar[str] = contextvars.ContextVar("conv_backend", default="xla")


@functools.cache
def available() -> bool:
    """True when the library is built and loads; registers its three custom calls once."""
    if not LIBRARY.exists():
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(LIBRARY))
    except OSError as e:  # e.g. built against a venv that is gone
        warnings.warn(f"{LIBRARY} does not load ({e}); {BUILD_HINT}", stacklevel=2)
        return False
    for name in ("forward", "backward_data", "backward_weights"):
        target = f"cnnjax_conv_{name}"
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), "cpu")
    return True


def resolve(name: str, devices: int = 1) -> str:
    """The backend, "xla" or "onednn", that a configured name selects for a computation over
    `devices` devices; "auto" means oneDNN on a single CPU device when the library is available.
    "onednn" where it cannot run is an error naming the fix: without the library, off the CPU,
    or over several devices (XLA cannot split a custom call's batch between devices)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown convolution backend {name!r}; choose one of {BACKENDS}")
    problem = (
        "runs on CPUs only" if jax.default_backend() != "cpu"
        else f"is not available ({LIBRARY}); {BUILD_HINT}" if not available()
        else f"runs on one device, not {devices}: use conv_backend=auto or xla" if devices > 1
        else None
    )  # fmt: skip
    if name == "onednn" and problem:
        raise ConfigError(f"the oneDNN convolution {problem}")
    if name == "auto":
        return "xla" if problem else "onednn"
    return name


def using(backend: str, fn: Callable) -> Callable:
    """`fn` with the convolutions it computes (those of `layers.Conv`) run by `backend`, "xla" or
    "onednn" (see `resolve`), for the duration of each call: the backend belongs to the wrapped
    function, so jit compiles it into that function and no other."""
    if backend not in ("xla", "onednn"):
        raise ValueError(f"convolution backend {backend!r}: use 'xla' or 'onednn' (see resolve)")
    if backend == "onednn" and not available():  # registers its custom calls
        raise RuntimeError(f"the oneDNN convolution is not available ({LIBRARY}); {BUILD_HINT}")

    @functools.wraps(fn)
    def with_backend(*args, **kwargs):
        token = _active.set(backend)
        try:
            return fn(*args, **kwargs)
        finally:
            _active.reset(token)

    return with_backend


def conv(
    x_BxHxWxC: jnp.ndarray,
    kernel_HxWxIxO: jnp.ndarray,
    bias_O: jnp.ndarray | None,
    strides: tuple[int, int],
    padding: str | Sequence[tuple[int, int]],
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> jnp.ndarray:
    """A 2D convolution plus bias. oneDNN's (bias inside its kernels) for float32 without
    groups inside `using("onednn", ...)`; XLA's `conv_general_dilated` and an add otherwise."""
    x, w = x_BxHxWxC, kernel_HxWxIxO
    fast = _active.get() == "onednn" and x.dtype == w.dtype == jnp.float32 and groups == 1
    if not fast:
        y = lax.conv_general_dilated(
            x,
            w,
            strides,
            padding,
            rhs_dilation=dilation,
            dimension_numbers=NHWC,
            feature_group_count=groups,
        )
        return y if bias_O is None else y + bias_O.astype(y.dtype)
    if isinstance(padding, str):  # the analysis's rule, so both agree on every pad
        sizes = zip(x.shape[1:3], w.shape[:2], strides, dilation, strict=True)
        padding = [resolve_padding(padding, *size) for size in sizes]
    n, h, wd, c = x.shape
    geometry = (
        n,
        c,
        h,
        wd,
        w.shape[3],
        *w.shape[:2],
        *strides,
        *(lo for lo, _ in padding),
        *(hi for _, hi in padding),
        *dilation,
    )
    no_bias = jnp.zeros((0,), jnp.float32)  # a zero-length bias: none
    return _conv(x, w, no_bias if bias_O is None else bias_O, tuple(int(g) for g in geometry))


def _call(target: str, shapes: list[tuple[int, ...]], *operands: jnp.ndarray, geometry):
    out = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    call = jax.ffi.ffi_call(f"cnnjax_conv_{target}", out, vmap_method="sequential")
    return call(*operands, geometry=np.asarray(geometry, np.int64))


def _output_shape(geometry: tuple[int, ...]) -> tuple[int, ...]:
    n, _, h, w, o, kh, kw, sh, sw, plh, plw, phh, phw, dh, dw = geometry
    oh = conv_output_size(h, kh, sh, (plh, phh), dh)
    return (n, oh, conv_output_size(w, kw, sw, (plw, phw), dw), o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv(x, w, b, geometry: tuple[int, ...]) -> jnp.ndarray:
    return _call("forward", [_output_shape(geometry)], x, w, b, geometry=geometry)[0]


def _conv_fwd(x, w, b, geometry):
    return _conv(x, w, b, geometry), (x, w, b.shape)


def _conv_bwd(geometry, residuals, dy):
    x, w, b_shape = residuals
    (dx,) = _call("backward_data", [x.shape], dy, w, geometry=geometry)
    dw, db = _call("backward_weights", [w.shape, b_shape], x, dy, geometry=geometry)
    return dx, dw, db


_conv.defvjp(_conv_fwd, _conv_bwd)
