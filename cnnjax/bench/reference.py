"""The PyTorch side of `python -m cnnjax.bench bench.mode=time_to_accuracy`: a cnnjax training
config's recipe, trained with the PyTorch twin until a test accuracy.

What is the same as `cnnjax.train`: the initial weights (the twin gets the Flax model's), the
data (`recipe.prepare` loads it), the preprocessing (uint8 / 255, then the dataset's mean and
std), every epoch's batches (`batches.epoch_plan`), the step plan, the optimizer (the torch
equal of the configured optax one, with optax's defaults), the learning rate of every step (the
configured schedule function, evaluated in Python), label smoothing, gradient clipping and when
the test split is evaluated. Dropout masks come from torch's generator, not JAX's, and torch's
BatchNorm keeps the unbiased batch variance in its running statistics (Flax the biased one:
a factor n/(n-1), n = batch x height x width). Options that torch cannot reproduce are refused
by `check`, before anything trains.
"""

import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig

from cnnjax import analysis, batches, data, models, recipe
from cnnjax.bench import twin
from cnnjax.errors import ConfigError

# optax arguments that torch's optimizers cannot take, and the only values reproduced exactly
_NO_TORCH_EQUAL = {
    "eps_root": 0.0,
    "mu_dtype": None,
    "mask": None,
    "accumulator_dtype": None,
    "nesterov": False,  # of Adam; SGD's nesterov has its torch equal
}


def torch_optimizer(optimizer: DictConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    """The torch optimizer class and arguments (but the learning rate, set each step) equal to
    the configured optax optimizer with its defaults filled in."""
    name = optimizer._target_
    kw = {
        k: p.default
        for k, p in inspect.signature(get_method(name)).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    kw |= {k: v for k, v in optimizer.items() if k not in ("_target_", "_partial_")}
    if name == "optax.sgd":
        cls, args = torch.optim.SGD, {"momentum": kw["momentum"] or 0.0}
        args["nesterov"] = bool(kw.pop("nesterov"))
    elif name in ("optax.adam", "optax.adamw"):
        cls, args = torch.optim.Adam, {"betas": (kw["b1"], kw["b2"]), "eps": kw["eps"]}
        if name == "optax.adamw":  # decoupled decay, scaled by the learning rate in both
            cls, args["weight_decay"] = torch.optim.AdamW, kw["weight_decay"]
    else:
        raise ConfigError(
            f"optimizer {name}: the PyTorch reference knows optax.adam, optax.adamw and optax.sgd"
        )
    differing = [f"{k}={kw[k]!r}" for k, v in _NO_TORCH_EQUAL.items() if k in kw and kw[k] != v]
    if differing:
        raise ConfigError(f"optimizer {name}: {', '.join(differing)} has no torch equal")
    return cls, args


def check(cfg: DictConfig) -> None:
    """Raise ConfigError, naming every option of the recipe that the reference cannot
    reproduce."""
    t, ds = cfg.trainer, cfg.dataset
    problems = []
    if t.precision != "fp32":
        problems.append(f"trainer.precision={t.precision} (the reference trains in float32)")
    augment = {k: v for k, v in (ds.get("augment") or {}).items() if v}
    if augment:
        problems.append(
            f"dataset.augment {dict(augment)} (JAX's random crops and flips cannot be redrawn)"
        )
    try:
        torch_optimizer(cfg.optimizer)
    except ConfigError as e:
        problems.append(str(e))
    model = instantiate(cfg.model)
    shape = models.input_shape(model)
    if shape[1:] != (ds.image_size, ds.image_size, ds.channels):
        problems.append(
            f"{ds.image_size}x{ds.image_size}x{ds.channels} images for a "
            f"{'x'.join(map(str, shape[1:]))} model (the reference feeds images that already fit)"
        )
    try:
        twin.check(analysis.analyze(model, shape))
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(
            "the PyTorch reference cannot reproduce this recipe: "
            + "; ".join(problems)
            + ". Change those options (bench.train_overrides) or run with bench.reference=null."
        )


class TwinTrainer:
    """A recipe's model as its PyTorch twin (same initial weights), with the torch optimizer,
    the schedule's rates and the data as NCHW tensors: training steps on index batches, and the
    test accuracy."""

    def __init__(self, cfg: DictConfig, r: recipe.Recipe):
        t, ds = cfg.trainer, cfg.dataset
        variables = jax.device_get({"params": r.state.params, **r.state.model_state})
        self.net = twin.build(r.table, variables, dropout=getattr(r.model, "dropout", 0.0))
        cls, args = torch_optimizer(cfg.optimizer)
        self.opt = cls(self.net.parameters(), lr=0.0, **args)
        steps = r.settings.total_steps
        self.rates = np.asarray(jax.vmap(r.schedule)(jnp.arange(steps)), np.float64)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.grad_clip_norm, self.eval_batch_size = t.grad_clip_norm, t.eval_batch_size
        channels = r.train_split.images_NxHxWxC.shape[-1]
        self.mean, self.std = (
            torch.from_numpy(np.resize(np.asarray(v, np.float32), channels)).view(1, -1, 1, 1)
            for v in (ds.mean, ds.std)
        )  # as batches.make_preprocess
        self.train_images, self.train_labels = _nchw(r.train_split)
        self.test_images, self.test_labels = _nchw(r.test_split)
        self.step = 0

    def inputs(self, images_BxCxHxW: torch.Tensor) -> torch.Tensor:
        """uint8 images scaled to [0, 1] and normalised with the dataset's mean and std."""
        return (images_BxCxHxW.float() / 255.0 - self.mean) / self.std

    def train_step(self, idx: np.ndarray) -> None:
        """One optimizer step on the training examples `idx`, at this step's scheduled rate."""
        for group in self.opt.param_groups:
            group["lr"] = float(self.rates[self.step])
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        idx = torch.from_numpy(idx)
        logits = self.net(self.inputs(self.train_images[idx]))
        self.loss_fn(logits, self.train_labels[idx]).backward()
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip_norm)
        self.opt.step()
        self.step += 1

    @torch.no_grad()
    def test_accuracy(self) -> float:
        self.net.eval()
        batches = zip(
            self.test_images.split(self.eval_batch_size),
            self.test_labels.split(self.eval_batch_size),
            strict=True,
        )
        correct = sum(int(self.net(self.inputs(x)).argmax(-1).eq(y).sum()) for x, y in batches)
        return correct / len(self.test_labels)


def _nchw(split: data.Split) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(split.images_NxHxWxC).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(split.labels_N.astype(np.int64))


def train_to_target(cfg: DictConfig, target: float) -> dict:
    """Train `cfg`'s recipe with the twin until a test evaluation reaches `target` (or the steps
    run out), as `cnnjax.train` does; wall seconds from after the check, data loading included."""
    check(cfg)
    start = time.perf_counter()
    r = recipe.prepare(cfg)
    s, trainer = r.settings, TwinTrainer(cfg, r)
    accuracy, reached = None, False
    plan = batches.epoch_plan(s.seed, len(trainer.train_labels), s.batch_size, s.total_steps)
    for epoch, indices in plan:
        for idx in indices:
            trainer.train_step(idx)
        if epoch % s.eval_every == 0 or trainer.step == s.total_steps:
            accuracy = trainer.test_accuracy()
            if accuracy >= target:
                reached = True
                break
    return {
        "torch_seconds": round(time.perf_counter() - start, 2),
        "torch_accuracy": accuracy,
        "torch_epochs": s.epoch(trainer.step),
        "torch_steps": trainer.step,
        "torch_reached_target": reached,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
