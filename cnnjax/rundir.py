"""A run directory, written and read in one place: `config.yaml` (the resolved config),
`metrics.jsonl` (a JSON object per line), `summary.json` and TensorBoard events."""

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tensorboardX import SummaryWriter

CONFIG, METRICS, SUMMARY = "config.yaml", "metrics.jsonl", "summary.json"


class RunWriter:
    """The side effects of a run: its config, metrics lines, TensorBoard events and summary. In
    a run of several processes only process 0's writer (`primary`) writes; the others do
    nothing."""

    def __init__(self, run_dir: Path, primary: bool = True):
        self.run_dir, self.primary = run_dir, primary
        self.metrics_path = run_dir / METRICS
        # TensorBoard: tensorboard --logdir outputs
        self.events = SummaryWriter(str(run_dir)) if primary else None

    def config(self, cfg: DictConfig) -> None:
        """config.yaml: `cfg` resolved."""
        if self.primary:
            (self.run_dir / CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))

    def metrics(self, **row) -> None:
        if not self.primary:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key not in ("step", "epoch", "split") and value is not None:
                self.events.add_scalar(f"{row['split']}/{key}", value, row["step"])
        self.events.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """Drop the lines of steps after `after_step` (a resumed run writes them again)."""
        if self.primary and self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["step"] <= after_step]
            tmp = self.metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.metrics_path)

    def summary(self, **fields) -> None:
        if not self.primary:
            return
        tmp = self.run_dir / f"{SUMMARY}.tmp"
        tmp.write_text(json.dumps(fields, indent=2) + "\n")
        tmp.replace(self.run_dir / SUMMARY)  # atomic: never a half-written summary

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def read_config(run_dir: Path) -> DictConfig | None:
    """The run's resolved config, None when it has no config.yaml."""
    path = run_dir / CONFIG
    return OmegaConf.load(path) if path.is_file() else None


def read_summary(run_dir: Path) -> dict | None:
    """summary.json, None when there is none; ValueError (json's) when it cannot be parsed."""
    path = run_dir / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(run_dir: Path) -> list[dict]:
    """The lines of metrics.jsonl (none when it is missing); a torn last line is skipped."""
    path, rows = run_dir / METRICS, []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
