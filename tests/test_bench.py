"""The bench's JSON in both modes, the PyTorch twin computing what the Flax model computes, and
the PyTorch reference training as cnnjax.train does."""

import itertools

import jax
import numpy as np
import pytest
from helpers import MODELS, RUNNABLE, compose_config
from hydra.utils import instantiate

from cnnjax import analysis, batches, bench, models, recipe
from cnnjax.errors import ConfigError

torch = pytest.importorskip("torch", reason="the torch extra is not installed (make test has it)")
from cnnjax.bench import reference, twin  # noqa: E402

BRANCHING = {  # residual adds or concatenations: no twin
    "resnet18", "resnet50", "resnet18_small", "resnet50_small", "mobilenet_v2",
    "mobilenet_v2_small", "densenet121", "densenet121_small",
}  # fmt: skip
CASES = [[f"model={name}"] for name in RUNNABLE if name not in BRANCHING]
CASES.append(["model=blocknet", "model.batch_norm=true"])
KEYS = {"model", "batch_size", "device", "cnnjax_train_img_s", "cnnjax_eval_img_s", "compile_s"}
TORCH_KEYS = {"torch_train_img_s", "ratio", "train_gflops"}
TTA_KEYS = {
    "mode", "target", "device", "jax_version", "cnnjax_seconds", "cnnjax_accuracy",
    "cnnjax_epochs", "cnnjax_reached_target", "torch_seconds", "torch_accuracy", "torch_epochs",
    "torch_reached_target", "torch_version", "ratio",
}  # fmt: skip


def toy(idx_dir) -> list[str]:
    """Overrides of the training recipe for the small generated dataset."""
    return [f"dataset.source_dir={idx_dir}", "dataset.name=toy", "trainer.eval_batch_size=128"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_exactly_the_models_with_branches_go_without_a_twin(name):
    model = instantiate(compose_config("train", f"model={name}").model)
    table = analysis.analyze(model, models.input_shape(model))
    assert twin.branches(table) == (name in BRANCHING)
    if name in BRANCHING:
        with pytest.raises(ConfigError, match="branches"):
            twin.check(table)
    assert set(MODELS) >= BRANCHING


@pytest.mark.parametrize("overrides", CASES, ids=" ".join)
def test_twin_gives_the_same_logits(overrides):
    model = instantiate(compose_config("train", *overrides).model)
    shape = models.input_shape(model, batch_size=2)
    x = jax.random.normal(jax.random.key(1), shape)
    variables = model.init(jax.random.key(0), x)
    net = twin.build(analysis.analyze(model, shape), jax.device_get(variables)).eval()
    got = net(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).detach().numpy()
    expected = np.asarray(model.apply(variables, x))
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max() + 1e-6)


def test_twin_refuses_branches():
    model = instantiate(compose_config("train", "model=resnet18_small").model)
    shape = models.input_shape(model)
    with pytest.raises(ValueError, match="chain models only"):
        twin.build(analysis.analyze(model, shape), {})


def test_bench_json_keys_and_ratio():
    cfg = compose_config("bench", "bench.steps=2", "bench.windows=2", "bench.warmup=1")
    out = bench.measure(cfg, "mnist_allconv")
    assert out["model"] == "mnist_allconv"
    assert set(out) >= KEYS | TORCH_KEYS
    assert out["ratio"] == round(out["cnnjax_train_img_s"] / out["torch_train_img_s"], 3)
    assert out["train_gflops"] == round(6 * 1_472_256 * out["cnnjax_train_img_s"] / 1e9, 3)
    assert out["cnnjax_train_img_s"] > 0 and out["torch_train_img_s"] > 0


def test_bench_without_reference():
    overrides = ["model=lenet", "bench.reference=null", "bench.steps=2", "bench.windows=1"]
    out = bench.measure(compose_config("bench", *overrides), "lenet")
    assert set(out) >= KEYS and "ratio" not in out and "torch_train_img_s" not in out


def test_time_to_accuracy_json_and_ratio(idx_dir):
    recipe = [*toy(idx_dir), "trainer.epochs=2", "schedule=constant"]  # 8 steps an epoch
    listed = ",".join(f'"{o}"' for o in recipe)
    cfg = compose_config(
        "bench", "bench.mode=time_to_accuracy", "bench.target=0.3",
        f"bench.train_overrides=[{listed}]",
    )  # fmt: skip
    out = bench.measure(cfg, "mnist_allconv")
    assert set(out) >= TTA_KEYS and (out["mode"], out["target"]) == ("time_to_accuracy", 0.3)
    assert out["model"] == "mnist_allconv"  # the training run's model, as its summary names it
    assert out["cnnjax_reached_target"] and out["torch_reached_target"]
    assert min(out["cnnjax_accuracy"], out["torch_accuracy"]) >= 0.3
    assert out["cnnjax_epochs"] == out["torch_epochs"] == 1.0  # the first evaluation reached it
    assert out["ratio"] == round(out["torch_seconds"] / out["cnnjax_seconds"], 3)


@pytest.mark.parametrize(
    "override, refusal",
    [
        ("dataset.augment.flip=true", "dataset.augment"),
        ("trainer.precision=bf16", "trainer.precision=bf16"),
        ("+optimizer.nesterov=true", "nesterov=True has no torch equal"),
        ("model=resnet18", "chain models only"),
    ],
)
def test_time_to_accuracy_refuses_what_torch_cannot_reproduce(override, refusal):
    cfg = compose_config(
        "bench", "bench.mode=time_to_accuracy", f'bench.train_overrides=["{override}"]'
    )
    with pytest.raises(ValueError, match="cannot reproduce this recipe") as e:
        bench.measure(cfg, "mnist_allconv")  # before either side trains
    assert refusal in str(e.value)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_the_torch_reference_takes_the_steps_cnnjax_takes(idx_dir, optimizer):
    cfg = compose_config(
        "train", *toy(idx_dir), f"optimizer={optimizer}", "schedule.warmup_steps=2",
        "trainer.label_smoothing=0.1", "trainer.grad_clip_norm=0.5",
    )  # fmt: skip
    r = recipe.prepare(cfg)
    trainer = reference.TwinTrainer(cfg, r)
    step = jax.jit(r.train_step)  # the recipe's own step: label smoothing 0.1 bound in
    state, split = r.state, r.train_split
    order = batches.epoch_batches(1024, 128, batches.epoch_order(0, 1))
    for idx in itertools.islice(order, 4):
        batch = {"image": split.images_NxHxWxC[idx], "label": split.labels_N[idx]}
        state, _ = step(state, batch, r.rng)
        trainer.train_step(idx)
    images = r.test_split.images_NxHxWxC[:64]
    variables = {"params": state.params, **state.model_state}
    expected = np.asarray(state.apply_fn(variables, r.preprocess(images)))
    got = trainer.net.eval()(trainer.inputs(trainer.test_images[:64])).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max())
