"""`python -m cnnjax.predict run_dir=<dir> images=<files or folders> [top_k=3] [format=table]`:
the run's top classes for each image file, decoded and preprocessed as its training images were
(upright, its channels, centre square resized to its image size, its normalisation)."""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig

from cnnjax import folders, trained
from cnnjax.errors import ConfigError, DataError, reported
from cnnjax.runtime import CONF_DIR


def image_paths(images) -> list[Path]:
    """The files `images` names: a file, a folder (its image files at any depth) or a list."""
    if not images:
        raise ConfigError("images=null: name image files or folders, e.g. images=photo.jpg")
    entries = list(images) if isinstance(images, list | ListConfig) else [images]
    paths = []
    for entry in map(Path, map(str, entries)):
        if entry.is_dir():
            paths += folders.image_files(entry)
        elif entry.is_file():
            paths.append(entry)
        else:
            raise DataError(f"images: {entry} does not exist; name image files or folders")
    if not paths:
        raise DataError(f"images={entries}: no image files ({', '.join(folders.SUFFIXES)}) there")
    return paths


def top_classes(run: trained.TrainedRun, paths: list[Path], top_k: int, batch_size: int) -> dict:
    """Each readable file's `top_k` classes with their probabilities, and why the others could
    not be read."""
    images, read, failed = trained.read_images(run, paths)
    probs = trained.probabilities(trained.logits(run, images, batch_size)) if read else []
    names = run.recipe.class_names
    rows = []
    for path, p in zip(read, probs, strict=True):
        best = p.argsort()[::-1][:top_k]
        rows.append({"file": str(path),
                     "top": [{"class": names[k], "index": int(k), "probability": float(p[k])}
                             for k in best]})  # fmt: skip
    return {"predictions": rows, "unreadable": {str(k): v for k, v in failed.items()}}


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
        if not (isinstance(cfg.top_k, int) and cfg.top_k >= 1):
            raise ConfigError(f"top_k={cfg.top_k}: use a whole number of at least 1, e.g. top_k=3")
        if not cfg.run_dir:
            raise ConfigError("run_dir=null: pass the directory of a `python -m cnnjax.train` run")
        paths = image_paths(cfg.images)
        run = trained.load(Path(cfg.run_dir), cfg.conv_backend)
        result = top_classes(run, paths, cfg.top_k, cfg.batch_size)
        if not result["predictions"]:
            why = table(result)
            raise DataError(f"none of the {len(paths)} files can be read as an image: {why}")
    print(json.dumps(result, indent=2) if cfg.format == "json" else table(result))


if __name__ == "__main__":
    main()
