"""`python -m cnnjax.bench [bench.mode=throughput|time_to_accuracy] [bench.reference=torch|null]
...`: cnnjax against the same network in PyTorch (when torch is installed). Writes
`bench.output` (JSON) and prints it.

`bench.mode=throughput` (`model=<name> [bench.batch_size=128] [bench.steps=30]`): train-step
and eval throughput, timed in alternating windows in one process. Both sides train on the same
synthetic uint8 batch (scaled to [0, 1] inside the step), with the configured optimizer (SGD
with momentum by default) and softmax cross-entropy. Images/s are the median over
`bench.windows` windows of `bench.steps` steps after warm-up; compile time is reported apart.
`ratio` is cnnjax's images/s over torch's: above 1, cnnjax is faster.

`bench.mode=time_to_accuracy` (`[bench.target=0.91]`, for instance with
`'bench.train_overrides=["trainer.epochs=2"]'`): wall seconds to a test accuracy with the
training recipe of conf/train.yaml (its defaults, then `bench.train_overrides`, which win).
cnnjax: `python -m cnnjax.train trainer.target_accuracy=...` in a subprocess, timed from its
start to its exit (interpreter start-up and imports included; `cnnjax_run_s` is the run's own
in-process figure, `cnnjax_compile_s` its first step's). PyTorch (`cnnjax.torch_reference`): the
same recipe with the twin, in process, from data loading on; options it cannot reproduce are
refused before either side trains. `ratio` is torch_seconds over cnnjax_seconds: above 1, cnnjax
is faster; it is null (with a `note`) when a side used up its steps below the target.

Both modes use the persistent compilation cache `bench.compilation_cache_dir` (null: off).
"""

import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from cnnjax import analysis, engine, onednn, train


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
    start = time.perf_counter()
    with onednn.backend(conv_backend):
        train = (
            jax.jit(functools.partial(engine.train_step, preprocess=_scale), donate_argnums=0)
            .lower(state, batch, key)
            .compile()
        )

        def train_step():
            nonlocal state
            state, metrics = train(state, batch, key)
            return metrics

        jax.block_until_ready(train_step())
        compile_s = time.perf_counter() - start
        evaluate = jax.jit(functools.partial(engine.eval_step, preprocess=_scale))
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

    from cnnjax import torch_reference, torch_twin

    net = torch_twin.build(table, variables)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)).permute(0, 3, 1, 2)
    labels = torch.from_numpy(rng.integers(0, num_classes, shape[0]).astype(np.int64))
    cls, args = torch_reference.torch_optimizer(optimizer_cfg)
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


def measure(cfg: DictConfig) -> dict:
    """The benchmark of `bench.mode` as a dict (also what `bench.output` gets)."""
    modes = {"throughput": throughput, "time_to_accuracy": time_to_accuracy}
    if cfg.bench.mode not in modes:
        raise ValueError(f"bench.mode={cfg.bench.mode!r}: use one of {sorted(modes)}")
    return modes[cfg.bench.mode](cfg)


def throughput(cfg: DictConfig) -> dict:
    """Train and eval images/s of both sides on a synthetic batch."""
    b = cfg.bench
    train.use_compilation_cache(b.compilation_cache_dir)
    model = instantiate(cfg.model)
    shape = analysis.summary_input_shape(model, b.batch_size)
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
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "batch_size": b.batch_size,
        **train.platform(),
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


def compose_train(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, as `python -m cnnjax.train` composes it."""
    if GlobalHydra.instance().is_initialized():  # inside main(): its search path
        return compose("train", overrides=overrides)
    with initialize_config_dir(str(train.CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def time_to_accuracy(cfg: DictConfig) -> dict:
    """Wall seconds of both sides to `bench.target` with the training recipe."""
    b = cfg.bench
    cache = train.use_compilation_cache(b.compilation_cache_dir)  # the reference's init, too
    overrides = [
        f"trainer.target_accuracy={b.target}",
        "trainer.progress=false",
        "trainer.compilation_cache_dir=" + (f"'{cache}'" if cache else "null"),
        *b.train_overrides,
    ]
    recipe = compose_train(overrides)
    target = recipe.trainer.target_accuracy
    if target is None:
        raise ValueError("bench.mode=time_to_accuracy needs a target: set bench.target")
    if b.reference == "torch":
        from cnnjax import torch_reference

        torch_reference.check(recipe)  # refuse before anything trains
    result = {
        "mode": "time_to_accuracy",
        "target": target,
        "model": recipe.model._target_.rsplit(".", 1)[-1],
        "dataset": recipe.dataset.name,
        **train.platform(),
    }
    train.load_dataset(recipe)  # prepared (TFDS) and in the page cache before either side
    result |= _train_cnnjax(overrides)
    if b.reference == "torch":
        result |= torch_reference.train_to_target(recipe, target)
        missed = [s for s in ("cnnjax", "torch") if not result[f"{s}_reached_target"]]
        result["ratio"] = (
            None if missed else round(result["torch_seconds"] / result["cnnjax_seconds"], 3)
        )
        if missed:
            result["note"] = (
                f"{' and '.join(missed)} did not reach {target} within the recipe's steps: "
                "no time to accuracy to compare"
            )
    return result


def _train_cnnjax(overrides: list[str]) -> dict:
    """`python -m cnnjax.train` with `overrides` in a temporary run directory: its wall seconds
    from start to exit and what its summary says."""
    with tempfile.TemporaryDirectory(prefix="cnnjax-bench-") as run_dir:
        args = [sys.executable, "-m", "cnnjax.train", *overrides, f"hydra.run.dir={run_dir}"]
        start = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        path = Path(run_dir) / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
    if proc.returncode != 0 or summary.get("status") != "completed":
        raise RuntimeError(
            f"the cnnjax run ({' '.join(args[1:])}) ended with status {summary.get('status')} "
            f"and exit code {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return {
        "cnnjax_seconds": round(seconds, 2),
        "cnnjax_accuracy": summary["test_accuracy"],
        "cnnjax_epochs": summary["epochs"],
        "cnnjax_steps": summary["steps"],
        "cnnjax_reached_target": summary["reached_target"],
        "cnnjax_compile_s": summary["compile_s"],
        "cnnjax_run_s": summary["total_wall_s"],
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    result = measure(cfg)
    Path(cfg.bench.output).write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(f"written to {cfg.bench.output}")


if __name__ == "__main__":
    main()
