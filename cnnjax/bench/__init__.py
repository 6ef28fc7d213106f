"""`python -m cnnjax.bench`: cnnjax against the same network in PyTorch, side by side; the only
package that imports torch (an optional extra, never needed to train).

`bench.mode=throughput` (`throughput.py`): train and eval images/s of both sides on a synthetic
batch. `bench.mode=time_to_accuracy` (`time_to_accuracy.py`): wall seconds of both to a test
accuracy with a training recipe. The PyTorch side is `twin.py` (the network, from the analysis
table, with the Flax weights) and `reference.py` (its training loop, as `cnnjax.train` trains).
"""

from omegaconf import DictConfig

from cnnjax.bench import throughput, time_to_accuracy
from cnnjax.errors import ConfigError


def measure(cfg: DictConfig, model_name: str) -> dict:
    """The benchmark of `bench.mode` as a dict (also what `bench.output` gets); `model_name` is
    the model's config name."""
    modes = {"throughput": throughput.measure, "time_to_accuracy": time_to_accuracy.measure}
    if cfg.bench.mode not in modes:
        raise ConfigError(f"bench.mode={cfg.bench.mode!r}: use one of {sorted(modes)}")
    return modes[cfg.bench.mode](cfg, model_name)
