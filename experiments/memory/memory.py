"""The memory wall of the notes' two chains (001): the 28x28x1 growing-channels table and the
400x400x3 chain of conv blocks and 1x1 transitions. Per layer: output, receptive field,
parameters and the fp32 bytes of its output per image (cnnjax.analysis); per chain: what a
training step needs and the largest batch that fits in 8, 16 and 80 GB (cnnjax.analysis.memory);
with --xla, the plan against the compiled step's own count (XLA:CPU's memory_analysis).

python experiments/memory/memory.py         # writes results/*.md and results/*.png (seconds)
python experiments/memory/memory.py --xla   # adds results/xla_check.md (compiles: minutes)

GB here is 1024**3 bytes and MB 1024**2, as `python -m cnnjax.summary plan.device_memory_gb=N`.
"""

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import jax
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cnnjax import analysis, models
from cnnjax.analysis import memory
from cnnjax.geometry import MIB
from cnnjax.models.blocknet import BlockNet
from cnnjax.plots.figures import DPI, new_figure
from cnnjax.report import md_table

HERE = Path(__file__).parent
RESULTS = HERE / "results"
CHAINS = ("growing_28", "blocks_400")  # model/<name>.yaml
NUM_CLASSES = 10  # Fashion-MNIST's; the configs take it from the dataset
FP32_BYTES = 4
DEVICES_GB = (8, 16, 80)
XLA_CHECKS = {  # chain -> (input size, batch sizes) compiled against the plan
    "growing_28": ((28, (8, 16, 32, 64)),),
    "blocks_400": ((64, (8, 32)), (400, (1, 2))),  # shrunk to 64x64, and the notes' 400x400
}


def chain(name: str, input_size: int | None = None) -> BlockNet:
    """The chain of model/<name>.yaml for 10 classes, on its own input size or `input_size`."""
    cfg = OmegaConf.load(HERE / "model" / f"{name}.yaml")
    cfg.num_classes = NUM_CLASSES
    if input_size is not None:
        cfg.input_size = input_size
    return instantiate(cfg)


def memory_rows(model: BlockNet) -> list[analysis.Row]:
    """The rows whose output is new memory (convs, pools, the global pool; not ReLU, dropout)."""
    table = analysis.analyze(model, models.input_shape(model))
    return [r for r in table.rows if not r.in_place]


def activation_bytes(row: analysis.Row) -> int:
    """The bytes of one image's output of `row` in fp32: H*W*C*4."""
    return row.activation_elements * FP32_BYTES


def largest_batches(step: memory.StepMemory, devices_gb: Sequence[float] = DEVICES_GB) -> list:
    """The largest batch of `step` that fits in each device size (GB = 1024**3 bytes)."""
    return [step.largest_batch(gb * memory.GIB) for gb in devices_gb]


def _shape(row: analysis.Row) -> str:
    return "x".join(map(str, row.output_shape[1:]))


def layer_table(rows: Sequence[analysis.Row]) -> str:
    """Markdown: each layer's output, channel maps, receptive field, parameters and fp32 bytes
    of its output per image, with the share of the chain's total."""
    total = sum(activation_bytes(r) for r in rows)
    header = [
        "layer",
        "output",
        "channel maps",
        "RF",
        "params",
        "output bytes / image (fp32)",
        "MB / image",
        "share",
    ]
    body = [
        [
            r.name,
            _shape(r),
            r.output_shape[-1],
            "?" if r.rf is None else r.rf[0],
            f"{r.params:,}",
            f"{activation_bytes(r):,}",
            f"{activation_bytes(r) / MIB:,.2f}",
            f"{activation_bytes(r) / total:.1%}",
        ]
        for r in rows
    ]
    body.append(
        [
            "total",
            "",
            "",
            "",
            f"{sum(r.params for r in rows):,}",
            f"{total:,}",
            f"{total / MIB:,.2f}",
            "",
        ]
    )
    return md_table(header, body)


def plan_table(steps: Sequence[memory.StepMemory], output_bytes: int) -> str:
    """Markdown: each plan's fixed bytes, bytes per image (what the backward pass keeps and the
    uint8 input), what it keeps against the fp32 layer outputs, and its largest batches."""
    header = [
        "optimizer",
        "precision",
        "fixed MB",
        "MB / image (kept + input)",
        "kept / fp32 outputs",
        *[f"batch in {gb} GB" for gb in DEVICES_GB],
    ]
    body = [
        [
            s.optimizer,
            s.precision,
            f"{s.fixed / MIB:,.1f}",
            f"{s.per_image / MIB:,.3f}",
            f"{s.activations_per_image / output_bytes:.2f}",
            *[f"{b:,}" for b in largest_batches(s)],
        ]
        for s in steps
    ]
    return md_table(header, body)


def xla_rows(name: str) -> list[list]:
    """The plan against XLA:CPU's count for the compiled training step, for each optimizer and
    precision at each size and batch of XLA_CHECKS[name]; XLA's growth per added image beside
    the plan's."""
    rows = []
    for size, batches in XLA_CHECKS[name]:
        model = chain(name, size)
        steps = memory.plans(model, models.input_shape(model))
        for step in steps:
            previous = None
            for batch in batches:
                check = memory.compare_with_xla(model, models.input_shape(model, batch), step)
                estimate, xla = check["estimate_mb"], check["xla_mb"]
                growth = (
                    ""
                    if previous is None
                    else f"{(xla - previous[1]) / (batch - previous[0]):,.2f}"
                )
                setting = [name, f"{size}x{size}", batch, step.optimizer, step.precision]
                figures = [f"{estimate:,.1f}", f"{xla:,.1f}", f"{check['ratio']:.2f}"]
                rows.append([*setting, *figures, f"{step.per_image / MIB:,.2f}", growth])
                previous = (batch, xla)
            jax.clear_caches()
    return rows


def plot_layers(tables: dict[str, list[analysis.Row]], path: Path) -> None:
    """Each layer's fp32 output per image, one panel per chain."""
    fig = new_figure((11, 5))
    for ax, (name, rows) in zip(fig.subplots(1, len(tables)), tables.items(), strict=True):
        rows = [r for r in rows if r.spatial]
        ax.barh([r.name for r in rows], [activation_bytes(r) / MIB for r in rows])
        ax.invert_yaxis()
        ax.set(xlabel="MB per image (fp32 output)", title=name)
        ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=DPI)


def plot_batches(plans: dict[str, list[memory.StepMemory]], path: Path) -> None:
    """The largest training batch with Adam against the device's memory, per chain and
    precision, each point labelled (SGD's fit a few more: the tables)."""
    fig = new_figure()
    ax = fig.subplots()
    for (name, steps), marker in zip(plans.items(), "os", strict=True):
        for step in (s for s in steps if s.optimizer == "adam"):
            batches = largest_batches(step)
            style = "-" if step.precision == "fp32" else "--"
            ax.plot(DEVICES_GB, batches, style, marker=marker, label=f"{name} {step.precision}")
            for gb, batch in zip(DEVICES_GB, batches, strict=True):
                ax.annotate(f"{batch:,}", (gb, batch), textcoords="offset points", xytext=(4, 4))
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="device memory (GB)",
        xlim=(6, 120),
        ylabel="largest training batch (Adam)",
        title="the largest batch that fits",
    )
    ax.set_xticks(DEVICES_GB, labels=[str(gb) for gb in DEVICES_GB])
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=DPI)


def main(xla: bool) -> None:
    RESULTS.mkdir(exist_ok=True)
    tables, plans = {}, {}
    for name in CHAINS:
        model = chain(name)
        tables[name] = memory_rows(model)
        start = time.perf_counter()
        plans[name] = memory.plans(model, models.input_shape(model))
        print(f"{name}: planned in {time.perf_counter() - start:.1f} s")
        output_bytes = sum(activation_bytes(r) for r in tables[name])
        text = f"{layer_table(tables[name])}\n\n{plan_table(plans[name], output_bytes)}\n"
        (RESULTS / f"{name}.md").write_text(text)
        print(text)
    plot_layers(tables, RESULTS / "memory_per_layer.png")
    plot_batches(plans, RESULTS / "largest_batch.png")
    if xla:
        start = time.perf_counter()
        rows = [row for name in CHAINS for row in xla_rows(name)]
        header = [
            "chain",
            "input",
            "batch",
            "optimizer",
            "precision",
            "estimate MB",
            "XLA MB",
            "XLA / estimate",
            "plan MB / image",
            "XLA MB / added image",
        ]
        text = md_table(header, rows) + "\n"
        (RESULTS / "xla_check.md").write_text(text)
        print(text, f"compiled in {time.perf_counter() - start:.0f} s", sep="\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--xla", action="store_true", help="compile and compare (minutes)")
    main(parser.parse_args().xla)
