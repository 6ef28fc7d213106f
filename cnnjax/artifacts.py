"""The files of a run directory: metrics lines, TensorBoard events and the summary."""

import json
from pathlib import Path

from tensorboardX import SummaryWriter


class RunWriter:
    """The side effects of a run: metrics lines, TensorBoard events and the summary. In a run
    of several processes only process 0's writer (`primary`) writes; the others' do nothing."""

    def __init__(self, run_dir: Path, primary: bool = True):
        self.run_dir, self.primary = run_dir, primary
        self.metrics_path = run_dir / "metrics.jsonl"
        # TensorBoard: tensorboard --logdir outputs
        self.events = SummaryWriter(str(run_dir)) if primary else None

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
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(fields, indent=2) + "\n")
        tmp.replace(self.run_dir / "summary.json")  # atomic: never a half-written summary

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
