"""Learning-rate schedules with one signature, `(learning_rate, total_steps, ...) -> schedule`,
so that `conf/schedule/*.yaml` can name any of them with `_target_` and `_partial_: true`."""

import optax


def constant(learning_rate: float, total_steps: int) -> optax.Schedule:
    """The same rate at every step."""
    return optax.constant_schedule(learning_rate)


def warmup_cosine(
    learning_rate: float, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0
) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `final_fraction` x peak."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * final_fraction,
    )


def onecycle(
    learning_rate: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> optax.Schedule:
    """Cosine one-cycle: from peak/div_factor up to the peak over the first `pct_start` of the
    steps, then down to peak/(div_factor*final_div_factor), as PyTorch's OneCycleLR."""
    return optax.cosine_onecycle_schedule(
        transition_steps=max(total_steps, 2),
        peak_value=learning_rate,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )


def step(
    learning_rate: float,
    total_steps: int,
    milestones: tuple[float, ...] = (0.5, 0.75),
    gamma: float = 0.1,
) -> optax.Schedule:
    """Piecewise constant: multiplied by `gamma` at each milestone, a fraction of the steps."""
    boundaries = {int(m * total_steps): gamma for m in milestones}
    return optax.piecewise_constant_schedule(learning_rate, boundaries)
