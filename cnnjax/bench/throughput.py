"""`bench.mode=throughput` (`model=<name> [bench.batch_size=128] [bench.steps=30]`): train-step
and eval throughput, timed in alternating windows in one process. Both sides train on the same
synthetic uint8 batch (scaled to [0, 1] inside the step), with the configured optimizer (SGD
with momentum by default) and softmax cross-entropy. Images/s are the median over
`bench.windows` windows of `bench.steps` steps after warm-up; compile time is reported apart.
`ratio` is cnnjax's images/s over torch's: above 1, cnnjax is faster. Uses the persistent
compilation cache `bench.compilation_cache_dir` (null: off).
"""

import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from cnnjax import analysis, engine, models, onednn, runtime


def _window(step: Callable[[], object], steps: int, batch_size: int) -> float:
    """Images/s of `steps` calls; `step` returns something to wait on."""
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)
    return steps * batch_size / (time.perf_counter() - start)


def _scale(images: jnp.ndarray) -> jnp.ndarray:
    return images.astype(jnp.float32) / 255.0


def cnnjax_runners(state: engine.TrainState, shape: tuple, num_classes: int, conv_backend: str):
    """A train step and an eval step on a fixed batch, compiled ahead with the convolutions of
    `conv_backend`, and the train step's trace + compile + first call seconds. The train step
    updates (and donates) `state`."""
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, num_classes, shape[0]).astype(np.int32)),
        "mask": jnp.ones(shape[0], jnp.float32),
    }
    key = jax.random.key(1)
    options = {"preprocess": _scale, "conv_backend": conv_backend}
    start = time.perf_counter()
    train = jax.jit(functools.partial(engine.train_step, **options), donate_argnums=0)
    train = train.lower(state, batch, key).compile()

    def train_step():
        nonlocal state
        state, metrics = train(state, batch, key)
        return metrics

    jax.block_until_ready(train_step())
    compile_s = time.perf_counter() - start
    evaluate = jax.jit(functools.partial(engine.eval_step, **options))
    evaluate = evaluate.lower(state, batch).compile()
    return train_step, lambda: evaluate(state, batch), compile_s


def torch_runners(
    variables: dict,
    table: analysis.Analysis,
    shape: tuple,
    num_classes: int,
    optimizer_cfg: DictConfig,
):
    """The PyTorch twin (with `variables`) and its train and eval steps on the same kind of
    batch, NCHW."""
    import torch

    from cnnjax.bench import reference, twin

    net = twin.build(table, variables)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)).permute(0, 3, 1, 2)
    labels = torch.from_numpy(rng.integers(0, num_classes, shape[0]).astype(np.int64))
    cls, args = reference.torch_optimizer(optimizer_cfg)
    opt = cls(net.parameters(), lr=optimizer_cfg.learning_rate, **args)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step():
        net.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(images.float() / 255.0), labels)
        loss.backward()
        opt.step()
        return None

    @torch.no_grad()
    def eval_step():
        net.eval()
        return net(images.float() / 255.0).argmax(-1).eq(labels).sum()

    return train_step, eval_step, torch.get_num_threads()


def measure(cfg: DictConfig, model_name: str) -> dict:
    """Train and eval images/s of both sides on a synthetic batch."""
    b = cfg.bench
    runtime.use_compilation_cache(b.compilation_cache_dir)
    model = instantiate(cfg.model)
    shape = models.input_shape(model, b.batch_size)
    table = analysis.analyze(model, shape)
    tx = instantiate(cfg.optimizer)()  # with its configured learning rate
    state = engine.create_train_state(model, tx, (1, *shape[1:]), jax.random.key(0))
    start_variables = jax.device_get({"params": state.params, **state.model_state})  # the twin's
    conv_backend = onednn.resolve(b.conv_backend)
    train_jax, eval_jax, compile_s = cnnjax_runners(
        state, shape, cfg.dataset.num_classes, conv_backend
    )
    runners = {"cnnjax": (train_jax, eval_jax)}
    result = {
        "mode": "throughput",
        "model": model_name,
        "batch_size": b.batch_size,
        **runtime.platform(),
        "conv_backend": conv_backend,
        "compile_s": round(compile_s, 3),
        "macs_per_image": table.totals.macs,
    }
    if b.reference == "torch":
        import torch

        train_t, eval_t, threads = torch_runners(
            start_variables, table, shape, cfg.dataset.num_classes, cfg.optimizer
        )
        runners["torch"] = (train_t, eval_t)
        result |= {"torch_version": torch.__version__, "torch_threads": threads}
    rates = {(name, kind): [] for name in runners for kind in ("train", "eval")}
    for train_step, evaluate in runners.values():  # warm-up
        _window(train_step, b.warmup, b.batch_size)
        _window(evaluate, b.warmup, b.batch_size)
    for _ in range(b.windows):  # alternating, so that drift hits every side alike
        for name, (train_step, evaluate) in runners.items():
            rates[name, "train"].append(_window(train_step, b.steps, b.batch_size))
            rates[name, "eval"].append(_window(evaluate, b.steps, b.batch_size))
    for (name, kind), values in rates.items():
        result[f"{name}_{kind}_img_s"] = round(statistics.median(values), 1)
    result["train_gflops"] = round(6 * table.totals.macs * result["cnnjax_train_img_s"] / 1e9, 3)
    if "torch" in runners:
        result["ratio"] = round(result["cnnjax_train_img_s"] / result["torch_train_img_s"], 3)
        result["eval_ratio"] = round(result["cnnjax_eval_img_s"] / result["torch_eval_img_s"], 3)
    result["mfu"] = None  # against the device's peak: on GPUs only (not measured on CPU)
    return result
