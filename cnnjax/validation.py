"""The checks a training config passes before anything is loaded, compiled or written: every
value of the right type and range, with the key, the value and an example of a good one."""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnjax import folders
from cnnjax.errors import ConfigError

Check = Callable[[Any], bool]


def _whole(minimum: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _number(low: float, high: float = math.inf, low_open: bool = True) -> Check:
    def ok(v: Any) -> bool:
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and v <= high

    return ok


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _one_of(*choices: Any) -> Check:
    return lambda v: v in choices and type(v) in {type(c) for c in choices}


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _numbers(check: Check) -> Check:
    """A non-empty list whose every entry passes `check`."""
    return lambda v: isinstance(v, list | ListConfig) and len(v) > 0 and all(map(check, v))


def _devices(v: Any) -> bool:
    return v in ("all", "per_job") or _whole(0)(v)


# key: (check, what a good value is, an example)
RULES: dict[str, tuple[Check, str, str]] = {
    "trainer.epochs": (_whole(1), "a whole number of at least 1", "8"),
    "trainer.max_steps": (
        _optional(_whole(1)),
        "null (train trainer.epochs) or a whole number of at least 1",
        "500",
    ),
    "trainer.batch_size": (_whole(1), "a whole number of at least 1", "128"),
    "trainer.eval_batch_size": (_whole(1), "a whole number of at least 1", "1000"),
    "trainer.eval_every": (_whole(1), "a whole number of epochs, at least 1", "1"),
    "trainer.log_every": (_whole(1), "a whole number of steps, at least 1", "50"),
    "trainer.checkpoint_every": (_whole(1), "a whole number of steps, at least 1", "1000"),
    "trainer.keep_checkpoints": (_whole(1), "a whole number of at least 1", "3"),
    "trainer.seed": (_whole(0), "a whole number of at least 0", "0"),
    "trainer.label_smoothing": (_number(0, 1, low_open=False), "a number in [0, 1]", "0.1"),
    "trainer.grad_clip_norm": (_optional(_number(0)), "null or a number above 0", "1.0"),
    "trainer.precision": (_one_of("fp32", "bf16"), "fp32 or bf16", "bf16"),
    "trainer.conv_backend": (_one_of("auto", "onednn", "xla"), "auto, onednn or xla", "auto"),
    "trainer.progress": (_flag, "true or false", "false"),
    "trainer.resume": (_flag, "true or false", "true"),
    "trainer.visualize": (_flag, "true or false", "true"),
    "trainer.target_accuracy": (_optional(_number(0, 1)), "null or a number in (0, 1]", "0.91"),
    "optimizer.learning_rate": (_number(0), "a finite number above 0", "3e-3"),
    "dataset.num_classes": (_whole(2), "a whole number of at least 2", "10"),
    "dataset.image_size": (_whole(1), "a whole number of pixels, at least 1", "28"),
    "dataset.channels": (_whole(1), "a whole number of at least 1", "1"),
    "dataset.mean": (
        _optional(_numbers(_number(-math.inf))),
        "null (the training images' own) or a list of numbers, one per channel",
        "[0.5]",
    ),
    "dataset.std": (
        _optional(_numbers(_number(0))),
        "null (the training images' own) or a list of numbers above 0, one per channel",
        "[0.25]",
    ),
    "distributed.devices": (_devices, "all, per_job or a device number", "all"),
}
# where the key is missing nothing is checked (e.g. an optimizer without weight decay)
OPTIONAL_RULES: dict[str, tuple[Check, str, str]] = {
    "optimizer.weight_decay": (_number(0, low_open=False), "a number of at least 0", "1e-4"),
    "optimizer.momentum": (
        _optional(_number(0, 1, low_open=False)),
        "null or a number in [0, 1]",
        "0.9",
    ),
    "dataset.augment.crop_padding": (_whole(0), "a whole number of pixels, at least 0", "2"),
    "dataset.augment.flip": (_flag, "true or false", "true"),
    "schedule.warmup_steps": (_whole(0), "a whole number of steps, at least 0", "100"),
    "dataset.source_format": (_one_of("idx", "image_folder"), "idx or image_folder", "idx"),
    "dataset.test_fraction": (lambda v: _number(0, 1)(v) and v < 1, "a number in (0, 1)", "0.2"),
    "dataset.split_seed": (_whole(0), "a whole number of at least 0", "0"),
}


def _shown(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    return repr(value) if isinstance(value, str) else str(value)


def _image_folder(ds: DictConfig) -> list[str]:
    """What an image folder config lacks (before its `num_classes`, which counts the folder's
    class folders, is read); DataError when the folder cannot be used."""
    if not ds.get("source_dir"):
        return [
            "dataset.source_dir=null must be the folder of your images, one sub-folder per class "
            "(e.g. dataset.source_dir=~/photos)"
        ]
    folders.class_names(Path(ds.source_dir).expanduser())  # DataError naming what is wrong
    if ds.get("channels") not in (1, 3):
        return [f"dataset.channels={ds.get('channels')} must be 1 (grey) or 3 (RGB) for images"]
    return []


def problems(cfg: DictConfig, prefix: str = "") -> list[str]:
    """What is wrong with a training config (only its keys starting with `prefix`), one entry
    per bad value (none: it is good)."""
    if OmegaConf.select(cfg, "dataset.source_format") == "image_folder" and (
        found := _image_folder(cfg.dataset)
    ):
        return found
    found = []
    rules = RULES | {
        key: rule for key, rule in OPTIONAL_RULES.items() if OmegaConf.select(cfg, key) is not None
    }
    rules = {key: rule for key, rule in rules.items() if key.startswith(prefix)}
    for key, (check, need, example) in rules.items():
        value = OmegaConf.select(cfg, key, default=None)
        if not check(value):
            found.append(f"{key}={_shown(value)} must be {need} (e.g. {key}={example})")
    ds = cfg.dataset
    for key in ("mean", "std"):
        values = ds.get(key)
        if isinstance(values, list | ListConfig) and len(values) not in (1, ds.get("channels")):
            found.append(
                f"dataset.{key} has {len(values)} values for {ds.get('channels')} channels: give "
                "one per channel, or one for all"
            )
    return found


def check(cfg: DictConfig, prefix: str = "") -> None:
    """Raise ConfigError naming every bad value of a training config (of its keys starting with
    `prefix`, e.g. "dataset."), with the fix."""
    found = problems(cfg, prefix)
    if found:
        several = len(found) > 1
        raise ConfigError(
            f"The configuration has {len(found)} bad value{'s' if several else ''}: "
            + "; ".join(found)
            + f". Set {'them' if several else 'it'} on the command line or in the config files; "
            "nothing was written."
        )
