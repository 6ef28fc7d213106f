"""`python -m cnnjax.predict run_dir=<dir> images=<files or folders> [top_k=3] [format=table]`:
the run's top classes for each image file, decoded and preprocessed as its training images were
(upright, its channels, centre square resized to its image size, its normalisation)."""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cnnjax import folders, trained
from cnnjax.errors import ConfigError, DataError, reported
from cnnjax.runtime import CONF_DIR


def table(result: dict) -> str:
    """One line per image: its file, then class (probability) for each of its top classes."""
    files = [r["file"] for r in result["predictions"]] + list(result["unreadable"])
    width = max(map(len, files), default=4)
    lines = [
        f"{r['file']:<{width}}  "
        + "  ".join(f"{t['class']} ({t['probability']:.3f})" for t in r["top"])
        for r in result["predictions"]
    ]
    lines += [f"{file:<{width}}  unreadable: {why}" for file, why in result["unreadable"].items()]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Entry point; exits with status 2 and the message when nothing can be predicted."""
    with reported():
        if cfg.format not in ("table", "json"):
            raise ConfigError(f"format={cfg.format!r}: use table or json")
        for key in ("top_k", "batch_size"):
            if not (isinstance(cfg[key], int) and cfg[key] >= 1):
                raise ConfigError(f"{key}={cfg[key]}: use a whole number of at least 1")
        if not cfg.run_dir:
            raise ConfigError("run_dir=null: pass the directory of a `python -m cnnjax.train` run")
        paths = folders.image_paths(cfg.images)
        run = trained.load(Path(cfg.run_dir).expanduser(), cfg.conv_backend)
        result = trained.top_classes(run, paths, cfg.top_k, cfg.batch_size)
        if not result["predictions"]:
            why = table(result)
            raise DataError(f"none of the {len(paths)} files can be read as an image: {why}")
    print(json.dumps(result, indent=2) if cfg.format == "json" else table(result))


if __name__ == "__main__":
    main()
