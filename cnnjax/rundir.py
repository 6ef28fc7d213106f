"""A run directory, written and read in one place: `config.yaml` (the resolved config),
`metrics.jsonl` (a JSON object per line), `summary.json`, TensorBoard events and `.lock`.

One process at a time works in a run directory (`Lock`). What a finished run left there is
replaced only once a new attempt has passed every check and starts to train (`RunWriter.begin`):
an attempt refused before that writes nothing.
"""

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cnnjax.errors import RunDirError

CONFIG, METRICS, SUMMARY, LOCK = "config.yaml", "metrics.jsonl", "summary.json", ".lock"
log = logging.getLogger("cnnjax.rundir")


def holds_run(run_dir: Path) -> bool:
    """True when an earlier attempt left a run here: a config, a summary, metrics or
    checkpoints."""
    checkpoints = run_dir / "checkpoints"
    return any((run_dir / name).exists() for name in (CONFIG, SUMMARY, METRICS)) or (
        checkpoints.is_dir() and any(checkpoints.iterdir())
    )


class Lock:
    """One process at a time in a run directory: an exclusive `flock` on its `.lock`, released
    by the kernel when the process ends, however it ends (a lock left by a killed process is
    free again). The file names the holder, for the message another process gets."""

    def __init__(self, run_dir: Path):
        self.path, self.file = run_dir / LOCK, None

    def __enter__(self) -> "Lock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = self.path.open("a+")
        except OSError as e:
            raise RunDirError(
                f"cannot work in {self.path.parent} ({e.strerror}): give the run a directory it "
                "may write in (hydra.run.dir=...)"
            ) from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunDirError(
                f"{self.path.parent} is in use by {holder}: one process at a time trains in a run "
                "directory. Wait for it to finish (or stop it), or give this run another "
                "hydra.run.dir."
            ) from None
        file.seek(0)
        previous = file.read().strip()
        if previous:
            log.info("took over the lock of %s, which no longer runs", previous)
        file.seek(0)
        file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        command = " ".join(sys.argv)
        file.write(f"process {os.getpid()} on {socket.gethostname()} since {started} ({command})")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc) -> None:
        self.file.seek(0)
        self.file.truncate()  # released: nobody holds it
        self.file.close()  # and the flock goes with it


def _summary_writer(run_dir: Path):
    """tensorboardX's SummaryWriter for `run_dir`. tensorboardX imports torch when it is
    installed (2 s of start-up on 2 cores), for torch tensors it is never given here: it is
    imported with torch hidden, and falls back to numpy as it does without torch."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(str(run_dir))


class RunWriter:
    """The side effects of a run: its config, metrics lines, TensorBoard events and summary. In
    a run of several processes only process 0's writer (`primary`) writes; the others do
    nothing. Nothing is written before `begin`, the moment the run starts to train."""

    def __init__(self, run_dir: Path, primary: bool = True):
        self.run_dir, self.primary = run_dir, primary
        self.metrics_path = run_dir / METRICS
        self.events = None  # tensorboardX's SummaryWriter, from `begin` on
        self.begun = False

    def begin(self, cfg: DictConfig, summary: dict, step: int) -> None:
        """The run starts to train from `step`: config.yaml and a "running" summary replace the
        last attempt's, and metrics lines past `step` go (the run writes them again)."""
        self.begun = True
        if not self.primary:
            return
        self.config(cfg)
        self.summary(**summary)
        self.truncate_metrics(after_step=step)
        self.events = _summary_writer(self.run_dir)  # TensorBoard: tensorboard --logdir outputs

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
            if self.events and key not in ("step", "epoch", "split") and value is not None:
                self.events.add_scalar(f"{row['split']}/{key}", value, row["step"])
        if self.events:
            self.events.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """Drop the lines of steps after `after_step`, and any torn line (with a warning)."""
        if not (self.primary and self.metrics_path.exists()):
            return
        kept, torn = [], 0
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if row.get("step", 0) <= after_step:
                kept.append(json.dumps(row) + "\n")
        if torn:
            log.warning("%s: dropped %d torn line(s) (a process killed mid-write)", METRICS, torn)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.metrics_path)

    def summary(self, **fields) -> None:
        if not self.primary:
            return
        write_json(self.run_dir / SUMMARY, fields)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def write_json(path: Path, content: dict) -> None:
    """`content` as indented JSON, written whole or not at all (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)


def read_config(run_dir: Path) -> DictConfig | None:
    """The run's resolved config, None when it has no config.yaml; RunDirError when it cannot
    be parsed."""
    path = run_dir / CONFIG
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml's and omegaconf's errors
        why = " ".join(str(e).split())  # one line
        raise RunDirError(f"{path} cannot be read ({type(e).__name__}: {why})") from None


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
