"""`python -m cnnjax.export run_dir=<dir> format=stablehlo|onnx [out_dir=...]`: the run's
eval-mode forward pass, uint8 images (batch, H, W, C) of its dataset's shape -> logits, with its
preprocessing and weights inside, as `model.stablehlo` (jax.export, for CPU, CUDA and TPU) or
`model.onnx` (the onnx extra), each with a `.json` that says how to load it; the written file
is run on test images and compared with JAX before the command ends."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cnnjax import exports, trained
from cnnjax.errors import ConfigError, reported
from cnnjax.runtime import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    """Entry point; exits with status 2 and the message when the run cannot be exported."""
    with reported():
        if not cfg.run_dir:
            raise ConfigError("run_dir=null: pass the directory of a `python -m cnnjax.train` run")
        exports.check_format(cfg.format)
        if not (isinstance(cfg.check_images, int) and cfg.check_images >= 1):
            raise ConfigError(f"check_images={cfg.check_images}: use a whole number of at least 1")
        run_dir = Path(cfg.run_dir).expanduser()
        run = trained.load(run_dir)
        fn, _ = trained.forward(run)
        about = {"run_dir": str(run_dir), "checkpoint_step": run.step,
                 "model": type(run.recipe.model).__name__, "class_names": run.recipe.class_names,
                 "normalisation": run.recipe.normalisation}  # fmt: skip
        images = run.recipe.test_split.images_NxHxWxC[: cfg.check_images]
        out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else run_dir / "export"
        path, described = exports.write(fn, images, cfg.format, out_dir, about)
    check = described["check"]
    print(
        f"wrote {path} ({described['bytes']:,} bytes) and {path.name}.json; read back and run on "
        f"{check['images']} test images: largest |logit difference| from JAX "
        f"{check['max_abs_diff_from_jax']:.3g}, same top class: {check['same_top_class']}"
    )


if __name__ == "__main__":
    main()
