"""`python -m cnnjax.summary model=<name> [dataset=<name>] [format=table|markdown|json]`: the
layer table of a model at its declared input size (see `cnnjax.analysis` for the conventions)."""

import json

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cnnjax import analysis, models
from cnnjax.errors import ConfigError, reported

COLUMNS = ("#", "layer", "type", "window", "pad", "output", "params", "MACs", "RF", "jump", "start")
RIGHT = {"#", "params", "MACs", "RF", "jump", "start"}


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


def cells(result: analysis.Analysis) -> list[list[str]]:
    """The table's rows as strings, in COLUMNS order."""
    return [
        [
            str(i),
            r.name,
            r.type,
            _window(r),
            _pad(r),
            "x".join(map(str, r.output_shape[1:])),
            f"{r.params:,}",
            f"{r.macs:,}",
            _axes(r.rf),
            _axes(r.jump),
            _axes(r.start, "{:g}"),
        ]
        for i, r in enumerate(result.rows, start=1)
    ]


def totals_lines(result: analysis.Analysis, smallest: int | None) -> list[str]:
    t = result.totals
    return [
        f"Smallest square input: {smallest}x{smallest}" if smallest else "Smallest input: none",
        f"Total params: {t.params:,}",
        f"Trainable params: {t.trainable_params:,}",
        f"Non-trainable params: {t.params - t.trainable_params:,}",
        f"MACs per image: {t.macs:,} ({t.macs / 1e6:,.2f} M)",
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


def warning_lines(result: analysis.Analysis) -> list[str]:
    rows = [f"{r.name}: {w}" for r in result.rows for w in r.warnings]
    return rows + list(result.warnings)


def render_markdown(result: analysis.Analysis, title: str, extra: list[str]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "|".join("---:" if c in RIGHT else "---" for c in COLUMNS) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in cells(result)]
    lines += ["", *[f"- {line}" for line in extra]]
    lines += [f"- warning: {w}" for w in warning_lines(result)]
    return "\n".join(lines) + "\n"


def print_table(result: analysis.Analysis, title: str, extra: list[str], console: Console) -> None:
    table = Table(title=title, title_justify="left")
    for c in COLUMNS:
        table.add_column(c, justify="right" if c in RIGHT else "left")
    for row in cells(result):
        table.add_row(*row)
    console.print(table)
    for line in extra:
        console.print(line, highlight=False)
    for w in warning_lines(result):
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


def report(cfg: DictConfig, model_name: str) -> str | None:
    """Analyse the configured model (`model_name`: its config name); print the table (or
    return Markdown/JSON text)."""
    model = instantiate(cfg.model)
    shape = models.input_shape(model)
    result = analysis.analyze(model, shape, batch_size=cfg.batch_size)
    smallest = analysis.smallest_input(model, shape)
    xla = analysis.xla_check(model, (cfg.batch_size, *shape[1:])) if cfg.xla else None
    title = f"{model_name} on {'x'.join(map(str, shape[1:]))} input"
    if cfg.format == "json":
        fields = {"model": model_name, "smallest_input": smallest, "xla": xla}
        return json.dumps(fields | result.to_dict(), indent=2)
    extra = totals_lines(result, smallest) + xla_lines(xla)
    if cfg.format == "markdown":
        return render_markdown(result, title, extra)
    if cfg.format == "table":
        print_table(result, title, extra, Console(width=cfg.width))
        return None
    raise ConfigError(f"format={cfg.format!r}: use table, markdown or json")


@hydra.main(version_base="1.3", config_path="../conf", config_name="summary")
def main(cfg: DictConfig) -> None:
    with reported():
        text = report(cfg, HydraConfig.get().runtime.choices["model"])
    if text is not None:
        print(text, end="" if text.endswith("\n") else "\n")


if __name__ == "__main__":
    main()
