"""`python -m cnnjax.summary model=<name> [dataset=<name>] [format=table|markdown|json]
[depth=N] [columns=[...]] [macs.bias=true] [plan.device_memory_gb=16]`: the layer table of a
model at its declared input size (see `cnnjax.analysis` for the conventions), and with
`plan.device_memory_gb` the memory of a training step and the largest batch that fits."""

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cnnjax import analysis, geometry, models
from cnnjax.analysis import memory
from cnnjax.errors import ConfigError, reported
from cnnjax.geometry import MIB
from cnnjax.runtime import CONF_DIR

DEFAULT_COLUMNS = ("#", "layer", "type", "window", "pad", "output", "params", "MACs", "RF", "jump",
                   "start")  # fmt: skip


@dataclass(frozen=True)
class View:
    """What a cell may need beyond its row: the whole table and the chosen conventions."""

    result: analysis.Analysis
    macs_bias: bool  # count bias additions as multiply-adds (torchinfo, the notes' LeNet table)


def _macs(row: analysis.Row, view: View) -> int:
    return row.macs + (row.bias_adds if view.macs_bias else 0)


def _shape(shape) -> str:
    return "x".join(map(str, shape[1:]))


Cell = Callable[[int, analysis.Row, View], str]
COLUMNS: dict[str, tuple[bool, Cell]] = {  # name -> (right-aligned, cell)
    "#": (True, lambda i, r, v: str(i)),
    "layer": (False, lambda i, r, v: r.name),
    "type": (False, lambda i, r, v: r.type),
    "input": (False, lambda i, r, v: _shape(r.input_shape)),
    "kernel": (False, lambda i, r, v: _axes(r.kernel) if r.kernel else ""),
    "window": (False, lambda i, r, v: _window(r)),
    "pad": (False, lambda i, r, v: _pad(r)),
    "output": (False, lambda i, r, v: _shape(r.output_shape)),
    "params": (True, lambda i, r, v: f"{r.params:,}"),
    "params %": (True, lambda i, r, v: f"{100 * r.params / max(v.result.totals.params, 1):.2f}"),
    "MACs": (True, lambda i, r, v: f"{_macs(r, v):,}"),
    "output MB": (True, lambda i, r, v: f"{geometry.mb(r.activation_elements):.3f}"),  # per image
    "RF": (True, lambda i, r, v: _axes(r.rf)),
    "jump": (True, lambda i, r, v: _axes(r.jump)),
    "start": (True, lambda i, r, v: _axes(r.start, "{:g}")),
}


def _axes(pair, fmt: str = "{}") -> str:
    """'3' when both axes agree, '3x5' (H x W) when they differ, '?' when unknown."""
    if pair is None:
        return "?"
    h, w = (fmt.format(v) for v in pair)
    return h if h == w else f"{h}x{w}"


def _window(row: analysis.Row) -> str:
    if row.kernel is None:
        return ""
    text = f"{_axes(row.kernel)}/{_axes(row.stride)}"
    if row.dilation and row.dilation != (1, 1):
        text += f" d{_axes(row.dilation)}"
    if row.groups and row.groups > 1:
        text += f" g{row.groups}"
    return text


def _pad(row: analysis.Row) -> str:
    if row.padding is None:
        return ""
    per_axis = [str(lo) if lo == hi else f"{lo},{hi}" for lo, hi in row.padding]
    return _axes(per_axis)


def columns(names: Sequence[str] | None) -> tuple[str, ...]:
    """The chosen columns, checked; the default set for None."""
    names = tuple(names) if names else DEFAULT_COLUMNS
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise ConfigError(
            f"columns={list(names)}: no column {unknown}; choose from {list(COLUMNS)}"
        )
    return names


def cells(view: View, names: Sequence[str] = DEFAULT_COLUMNS) -> list[list[str]]:
    """The table's rows as strings, in the order of `names`."""
    return [
        [COLUMNS[n][1](i, r, view) for n in names] for i, r in enumerate(view.result.rows, start=1)
    ]


def totals_lines(view: View, smallest: int | None) -> list[str]:
    t = view.result.totals
    macs = sum(_macs(r, view) for r in view.result.rows)
    convention = " counting bias adds" if view.macs_bias else ""
    return [
        f"Smallest square input: {smallest}x{smallest}" if smallest else "Smallest input: none",
        f"Total params: {t.params:,}",
        f"Trainable params: {t.trainable_params:,}",
        f"Non-trainable params: {t.params - t.trainable_params:,}",
        f"MACs per image{convention}: {macs:,} ({macs / 1e6:,.2f} M)",
        f"Input size (MB): {t.input_mb:.2f}",
        f"Forward/backward pass size (MB): {t.activation_mb:.2f}",
        f"Params size (MB): {t.param_mb:.2f}",
        f"Estimated Total Size (MB): {t.total_mb:.2f}  (batch size {t.batch_size})",
    ]


def xla_lines(xla: dict | None) -> list[str]:
    if xla is None:
        return []
    return [
        f"XLA forward flops: {xla['xla_forward_flops']:,.0f} = {xla['flops_ratio']:.3f} x 2 x MACs"
        " (XLA skips taps on padding and adds biases, pooling, activations)",
        f"XLA training step buffers (MB): {xla['xla_step_mb']:.2f} = "
        f"{xla['memory_ratio']:.2f} x the estimate",
    ]


def plan_lines(
    plans: list[memory.StepMemory], budget_gb: float, batch: int, xla: list
) -> list[str]:
    """One line per optimizer and precision: fixed MB, MB per image, the largest batch."""
    lines = [f"Training memory (MB; the largest batch in {budget_gb:g} GB):"]
    for i, p in enumerate(plans):
        line = (
            f"  {p.optimizer:>4} {p.precision}: params {p.params / MIB:,.1f} + gradients "
            f"{p.gradients / MIB:,.1f} + optimizer {p.optimizer_state / MIB:,.1f} + other "
            f"{(p.model_state + p.compute_copy) / MIB:,.1f}, per image {p.per_image / MIB:,.3f}"
            f" -> batch {p.largest_batch(budget_gb * memory.GIB):,}"
        )
        if xla:
            c = xla[i]
            line += f"; at batch {batch}: {c['estimate_mb']:,.1f}, XLA {c['xla_mb']:,.1f}"
        lines.append(line)
    return lines


def warning_lines(result: analysis.Analysis) -> list[str]:
    rows = [f"{r.name}: {w}" for r in result.rows for w in r.warnings]
    return rows + list(result.warnings)


def render_markdown(view: View, names, title: str, extra: list[str]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(names) + " |"]
    lines.append("|" + "|".join("---:" if COLUMNS[c][0] else "---" for c in names) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in cells(view, names)]
    lines += ["", *[f"- {line}" for line in extra]]
    lines += [f"- warning: {w}" for w in warning_lines(view.result)]
    return "\n".join(lines) + "\n"


def print_table(view: View, names, title: str, extra: list[str], console: Console) -> None:
    table = Table(title=title, title_justify="left")
    for c in names:
        table.add_column(c, justify="right" if COLUMNS[c][0] else "left")
    for row in cells(view, names):
        table.add_row(*row)
    console.print(table)
    for line in extra:
        console.print(line, highlight=False)
    for w in warning_lines(view.result):
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


def _plan(cfg: DictConfig, model, shape) -> tuple[list, list]:
    """The memory plans for every optimizer and precision, and XLA's figures when asked."""
    if cfg.plan.device_memory_gb is None:
        return [], []
    if not cfg.plan.device_memory_gb > 0:
        raise ConfigError(
            f"plan.device_memory_gb={cfg.plan.device_memory_gb}: use a size in GB > 0"
        )
    batch_shape = (cfg.batch_size, *shape[1:])
    plans = memory.plans(model, batch_shape)
    xla = [memory.compare_with_xla(model, batch_shape, p) for p in plans] if cfg.plan.xla else []
    return plans, xla


def report(cfg: DictConfig, model_name: str) -> str | None:
    """Analyse the configured model (`model_name`: its config name); print the table (or
    return Markdown/JSON text)."""
    model = instantiate(cfg.model)
    shape = models.input_shape(model)
    names = columns(cfg.columns)
    result = analysis.analyze(model, shape, batch_size=cfg.batch_size)
    smallest = analysis.smallest_input(model, shape)
    if cfg.depth is not None:
        result = analysis.fold(result, cfg.depth)
    xla = analysis.xla_check(model, (cfg.batch_size, *shape[1:])) if cfg.xla else None
    plans, plan_xla = _plan(cfg, model, shape)
    title = f"{model_name} on {'x'.join(map(str, shape[1:]))} input"
    view = View(result, cfg.macs.bias)
    if cfg.format == "json":
        fields = {"model": model_name, "smallest_input": smallest, "xla": xla}
        fields["plan"] = [dataclasses.asdict(p) for p in plans] or None
        return json.dumps(fields | result.to_dict(), indent=2)
    extra = totals_lines(view, smallest) + xla_lines(xla)
    if plans:
        extra += plan_lines(plans, cfg.plan.device_memory_gb, cfg.batch_size, plan_xla)
    if cfg.format == "markdown":
        return render_markdown(view, names, title, extra)
    if cfg.format == "table":
        print_table(view, names, title, extra, Console(width=cfg.width))
        return None
    raise ConfigError(f"format={cfg.format!r}: use table, markdown or json")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="summary")
def main(cfg: DictConfig) -> None:
    with reported():
        text = report(cfg, HydraConfig.get().runtime.choices["model"])
    if text is not None:
        print(text, end="" if text.endswith("\n") else "\n")


if __name__ == "__main__":
    main()
