"""`python -m cnnjax.summary`: every model config, the three formats, and the error path."""

import json
import subprocess
import sys

import pytest
from helpers import MODELS, compose_config

from cnnjax import summary

ROW_KEYS = {"name", "type", "input_shape", "output_shape", "params", "macs", "rf", "jump", "start"}
TOTAL_KEYS = {"params", "trainable_params", "macs", "param_mb", "activation_mb", "total_mb"}


def _report(name: str, *overrides: str):
    return summary.report(compose_config("summary", f"model={name}", *overrides), name)


@pytest.mark.parametrize("name", MODELS)
def test_json_for_every_model(name):
    out = json.loads(_report(name, "format=json"))
    assert out["model"] == name and out["layers"] and set(out["totals"]) >= TOTAL_KEYS
    for row in out["layers"]:
        assert set(row) >= ROW_KEYS
        assert len(row["output_shape"]) in (2, 4) and row["output_shape"][0] == 1
        assert all(len(row[k]) == 2 for k in ("rf", "jump", "start"))
    assert out["layers"][-1]["output_shape"] == [1, 10]
    assert out["totals"]["params"] == sum(r["params"] + r["state"] for r in out["layers"])


def test_markdown_allconv():
    text = _report("mnist_allconv", "format=markdown")
    assert text.startswith("### mnist_allconv on 28x28x1 input")
    assert "| 15 | conv7 | Conv | 3/1 | 0 | 1x1x10 | 5,770 | 5,760 | 40 | 4 | 14 |" in text
    assert "- Estimated Total Size (MB): 0.30  (batch size 1)" in text
    assert "- Smallest square input: 28x28" in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cnnjax.summary", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_table_and_error():
    done = _cli("model=alexnet", "dataset.num_classes=1000")
    assert done.returncode == 0, done.stderr
    assert "Total params: 62,378,344" in done.stdout
    assert "Smallest square input: 67x67" in done.stdout
    bad = _cli("model=alexnet", "model.input_size=28")
    assert bad.returncode == 2
    assert "'pool2'" in bad.stderr and "67x67" in bad.stderr
