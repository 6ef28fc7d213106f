"""`python -m cnnjax.evaluate run_dir=<dir> [dataset=<name>] [split=test]`: a run's newest
readable checkpoint evaluated on its test split (the numbers equal the run's final test metrics)
or on a split of another dataset of the same image shape. Writes `eval.json` (accuracy, loss,
per-class accuracy, confusion matrix) and, beside it, a CSV of every image's prediction."""

import csv
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cnnjax import data, rundir, trained, validation
from cnnjax.errors import ConfigError, reported
from cnnjax.runtime import CONF_DIR


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


def output_path(run_dir: Path, out: str | None, other: DictConfig | None, split: str) -> Path:
    """Where eval.json goes: `out`, else <run_dir>/eval.json for the run's own test split and
    eval_<dataset>_<split>.json otherwise; never one of the run's own files."""
    if out:
        path = Path(out).expanduser()
    elif other is None and split == "test":
        path = run_dir / "eval.json"
    else:
        path = run_dir / f"eval_{(other.name if other is not None else 'own')}_{split}.json"
    if path.suffix != ".json" or path.name in (rundir.CONFIG, rundir.SUMMARY):
        raise ConfigError(f"out={out}: name a new .json file (the per-image .csv goes beside it)")
    if not path.parent.is_dir():
        raise ConfigError(f"out={out}: the folder {path.parent} does not exist; create it first")
    return path


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Entry point; exits with status 2 and the message when the run cannot be evaluated."""
    with reported():
        if not cfg.run_dir:
            raise ConfigError("run_dir=null: pass the directory of a `python -m cnnjax.train` run")
        other = cfg.get("dataset")
        if other is not None:
            validation.check(cfg, prefix="dataset.")
        run_dir = Path(cfg.run_dir).expanduser()
        out = output_path(run_dir, cfg.out, other, cfg.split)
        run = trained.load(run_dir, cfg.conv_backend)
        split, source = trained.evaluation_split(run, cfg.split, other)
        name = (other or run.cfg.dataset).name
        batch_size = cfg.batch_size or run.cfg.trainer.eval_batch_size
        result, logits = trained.evaluate(run, split, batch_size)
        header = {"run_dir": str(run_dir), "checkpoint_step": run.step, "dataset": name,
                  "source": source, "split": cfg.split,
                  "conv_backend": run.conv_backend}  # fmt: skip
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
