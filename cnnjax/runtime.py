"""What a process sets up before it computes: its configs, JAX's persistent compilation cache,
the platform it reports, and joining the other processes of a distributed run."""

import os
from pathlib import Path

import jax
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from jax.experimental.compilation_cache import compilation_cache
from omegaconf import DictConfig, OmegaConf

from cnnjax import folders
from cnnjax.errors import ConfigError, DataError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # every command's configs


def _class_count(source_dir: str | None) -> int | None:
    """${cnnjax.classes:<folder>}: the number of class folders of an image folder; None when
    it cannot be counted (the training config's checks then say why)."""
    try:
        return folders.count_classes(source_dir)
    except DataError:
        return None


OmegaConf.register_new_resolver("cnnjax.classes", _class_count, replace=True)


def compose(config_name: str, overrides: list[str] = ()) -> DictConfig:
    """conf/<config_name>.yaml with `overrides`, as its command composes it (inside a command,
    with that command's search path)."""
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name, overrides=list(overrides))
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def use_compilation_cache(directory: str | None) -> str | None:
    """Point JAX's persistent compilation cache at `directory` (`~` expanded; None turns it off),
    caching every compilation however quick or small; returns the directory in use."""
    path = os.path.expanduser(directory) if directory else None
    if path != jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()  # the next compilation opens the new directory
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor
    return path


def platform() -> dict:
    """The JAX device and version, as summaries and benchmarks record them."""
    return {"device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__}


def launched_as_several_processes() -> bool:
    """True inside a launch of several processes that `jax.distributed` recognises by itself:
    an srun step of several SLURM tasks, or an Open MPI job of several ranks."""
    slurm = "SLURM_STEP_NODELIST" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1
    return slurm or int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1)) > 1


def join_processes(
    initialize: str | bool = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str = "gloo",
    initialization_timeout_s: int = 300,
) -> bool:
    """Join this process to the others of the run with `jax.distributed.initialize` (before
    anything touches a device). `initialize="auto"` joins when a coordinator address is given
    or a cluster launched several processes; returns whether the process is part of several."""
    if initialize not in ("auto", True, False):
        raise ConfigError(f"distributed.initialize={initialize!r}: use auto, true or false")
    wanted = initialize is True or (
        initialize == "auto" and (bool(coordinator_address) or launched_as_several_processes())
    )
    if not wanted:
        return False
    if not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout_s,
        )
    return True
