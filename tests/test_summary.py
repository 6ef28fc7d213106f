"""`python -m cnnjax.summary`: the three formats on a few model configs, and the error path."""

import json
import subprocess
import sys

import pytest
from helpers import compose_config

from cnnjax import summary

ROW_KEYS = {"name", "type", "input_shape", "output_shape", "params", "macs", "rf", "jump", "start"}
TOTAL_KEYS = {"params", "trainable_params", "macs", "param_mb", "activation_mb", "total_mb"}


def _report(name: str, *overrides: str):
    return summary.report(compose_config("summary", f"model={name}", *overrides), name)


# the JSON's form, on a plain net, a flattening one, one with additions, one with depthwise
# convs; every model's analysis (what the JSON holds) is checked in test_analysis
JSON_MODELS = ["mnist_allconv", "lenet", "resnet18_small", "mobilenet_v2_small"]


@pytest.mark.parametrize("name", JSON_MODELS)
def test_json_of_a_model(name):
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


def test_depth_folds_modules_into_their_parents():
    out = json.loads(_report("resnet50", "format=json"))
    folded = json.loads(_report("resnet50", "format=json", "depth=1"))
    names = [r["name"] for r in folded["layers"]]
    assert len(names) == 22 and names[4:7] == ["layer1_0", "layer1_1", "layer1_2"]
    assert folded["layers"][4]["type"] == "Bottleneck"
    for key in ("params", "macs"):
        assert sum(r[key] for r in folded["layers"]) == sum(r[key] for r in out["layers"])
    assert folded["layers"][4]["rf"] == [19, 19]  # the block's last row's receptive field


def test_columns_and_the_notes_lenet5_table_with_bias_adds():
    columns = "columns=[layer,input,params,'params %',MACs,'output MB']"
    text = _report("lenet5", "format=markdown", "macs.bias=true", columns)
    assert "| layer | input | params | params % | MACs | output MB |" in text
    # the notes' LeNet-5-like table: (5*5*3 + 1)*6 * 28*28 = 456*784, 2416*100, 48120, 7744, 650
    for name, macs in [("conv1", 357_504), ("conv2", 241_600), ("conv3", 48_120),
                       ("fc1", 7_744), ("fc2", 650)]:  # fmt: skip
        assert f"| {name} |" in text and f"| {macs:,} |" in text
    assert "- MACs per image counting bias adds: 655,618" in text
    with pytest.raises(summary.ConfigError, match="no column \\['colour'\\]"):
        _report("lenet5", "columns=[layer,colour]")


def test_plan_answers_the_largest_batch():
    text = _report("vgg11_small", "format=markdown", "plan.device_memory_gb=0.25")
    lines = [line for line in text.splitlines() if "->" in line]
    assert len(lines) == 4 and all("batch " in line for line in lines)
    sgd32, sgd16, adam32, adam16 = (
        int(line.split("batch ")[-1].replace(",", "")) for line in lines
    )
    assert sgd16 > sgd32 > 0 and adam16 > adam32 > 0 and sgd32 >= adam32
