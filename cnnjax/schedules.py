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
