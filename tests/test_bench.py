"""The bench's JSON, and the PyTorch twin computing what the Flax model computes."""

import jax
import numpy as np
import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cnnjax import analysis, bench

torch = pytest.importorskip("torch", reason="the torch extra is not installed (make test has it)")
from cnnjax import torch_twin  # noqa: E402

CHAIN_MODELS = ["alexnet", "blocknet", "lenet", "lenet5", "mnist_allconv", "vgg11", "vgg16"]
SMALL_VGG = ["model.input_size=32", "model.head_pool=1", "model.classifier_width=64"]
CASES = [[f"model={name}", *(SMALL_VGG if "vgg" in name else [])] for name in CHAIN_MODELS]
CASES.append(["model=blocknet", "model.batch_norm=true"])
KEYS = {"model", "batch_size", "device", "cnnjax_train_img_s", "cnnjax_eval_img_s", "compile_s"}
TORCH_KEYS = {"torch_train_img_s", "ratio", "train_gflops"}


def _cfg(name: str, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_every_chain_model_is_pinned():
    models = {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
    assert models - set(CHAIN_MODELS) == {"resnet18", "resnet50"}  # branches: no twin


@pytest.mark.parametrize("overrides", CASES, ids=" ".join)
def test_twin_gives_the_same_logits(overrides):
    model = instantiate(_cfg("train", *overrides).model)
    shape = analysis.summary_input_shape(model, batch_size=2)
    x = jax.random.normal(jax.random.key(1), shape)
    variables = model.init(jax.random.key(0), x)
    twin = torch_twin.build(analysis.analyze(model, shape), jax.device_get(variables)).eval()
    got = twin(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).detach().numpy()
    expected = np.asarray(model.apply(variables, x))
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max() + 1e-6)


def test_twin_refuses_branches():
    model = instantiate(_cfg("train", "model=resnet18", "model.input_size=32").model)
    shape = analysis.summary_input_shape(model)
    with pytest.raises(ValueError, match="chain models only"):
        torch_twin.build(analysis.analyze(model, shape), {})


def test_bench_json_keys_and_ratio():
    out = bench.measure(_cfg("bench", "bench.steps=2", "bench.windows=2", "bench.warmup=1"))
    assert set(out) >= KEYS | TORCH_KEYS
    assert out["ratio"] == round(out["cnnjax_train_img_s"] / out["torch_train_img_s"], 3)
    assert out["train_gflops"] == round(6 * 1_472_256 * out["cnnjax_train_img_s"] / 1e9, 3)
    assert out["cnnjax_train_img_s"] > 0 and out["torch_train_img_s"] > 0


def test_bench_without_reference():
    cfg = _cfg("bench", "model=lenet", "bench.reference=null", "bench.steps=2", "bench.windows=1")
    out = bench.measure(cfg)
    assert set(out) >= KEYS and "ratio" not in out and "torch_train_img_s" not in out
