"""`python -m cnnjax.evaluate run_dir=<dir> [dataset=<name>] [split=test]`: a run's newest
readable checkpoint evaluated on its test split (the numbers equal the run's final test metrics)
or on a split of another dataset of the same image shape. Writes `eval.json` (accuracy, loss,
per-class accuracy, confusion matrix) and, beside it, a CSV of every image's prediction."""

import csv
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cnnjax import data, recipe, rundir, trained, validation
from cnnjax.errors import ConfigError, reported
from cnnjax.runtime import CONF_DIR


def evaluation_split(run: trained.TrainedRun, cfg: DictConfig) -> tuple[data.Split, str]:
    """The split `cfg` asks for and its dataset's name: of the run's own dataset, or of
    `cfg.dataset`, checked to fit the run (image shape, labels below its classes)."""
    split, dataset = cfg.split, cfg.get("dataset")
    if split not in ("test", "train"):
        raise ConfigError(f"split={split!r}: use test or train")
    if dataset is None:
        r = run.recipe
        return (r.test_split if split == "test" else r.train_split), run.cfg.dataset.name
    validation.check(cfg, prefix="dataset.")
    loaded = recipe.load_dataset(dataset)
    chosen = loaded.test if split == "test" else loaded.train
    ds = run.cfg.dataset
    data.check_fits(chosen, f"{dataset.name} {split}", ds.image_size, ds.channels, ds.num_classes)
    return chosen, dataset.name


def write_predictions(path: Path, split: data.Split, logits, names: list[str]) -> None:
    """A CSV row per example: index, file (where the data records it), label, predicted,
    probability of the predicted class."""
    probs = trained.probabilities(logits)
    predicted = probs.argmax(-1)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["index", "file", "label", "predicted", "probability"])
        for i, (label, k) in enumerate(zip(split.labels_N, predicted, strict=True)):
            file = split.files_N[i] if split.files_N is not None else ""
            out.writerow([i, file, names[label], names[k], f"{probs[i, k]:.6f}"])
    tmp.replace(path)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Entry point; exits with status 2 and the message when the run cannot be evaluated."""
    with reported():
        if not cfg.run_dir:
            raise ConfigError("run_dir=null: pass the directory of a `python -m cnnjax.train` run")
        run_dir = Path(cfg.run_dir)
        run = trained.load(run_dir, cfg.conv_backend)
        split, name = evaluation_split(run, cfg)
        batch_size = cfg.batch_size or run.cfg.trainer.eval_batch_size
        result, logits = trained.evaluate(run, split, batch_size)
        default = "eval.json" if (cfg.get("dataset"), cfg.split) == (None, "test") else (
            f"eval_{name}_{cfg.split}.json"
        )  # fmt: skip
        out = Path(cfg.out) if cfg.out else run_dir / default
        header = {"run_dir": str(run_dir), "checkpoint_step": run.step, "dataset": name,
                  "split": cfg.split, "conv_backend": run.conv_backend}  # fmt: skip
        rundir.write_json(out, header | result)
        write_predictions(out.with_suffix(".csv"), split, logits, result["class_names"])
    print(
        f"{name} {cfg.split} split, {result['examples']:,} images, checkpoint step {run.step}: "
        f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}"
    )
    for cls, accuracy in result["per_class_accuracy"].items():
        print(f"  {cls:>20}: " + ("no images" if accuracy is None else f"{accuracy:.4f}"))
    print(f"wrote {out} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
