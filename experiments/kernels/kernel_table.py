"""Cosine similarity of mnist_allconv's learned conv1 kernels with the hand-set 3x3 kernels of
`cnnjax.plots.kernels` (mean removed, up to sign), the same kernels at initialisation (the
run's seed), what random kernels score by chance, and the hand-set kernels against each other.

python experiments/kernels/kernel_table.py multirun/study_kernels/mnist_allconv
# prints the tables and writes them to results/similarity.md
"""

import sys
from pathlib import Path

import numpy as np

from cnnjax import trained
from cnnjax.plots import kernels

RESULTS = Path(__file__).parent / "results"
FIRST_CONV = "conv1"  # mnist_allconv's first layer: 8 kernels 3x3x1
CHANCE_KERNELS = 100_000  # random kernels for the chance level
QUANTILES = (0.5, 0.9, 0.95, 0.99)


def chance_best(n: int, seed: int = 0) -> np.ndarray:
    """The best |cosine| with a hand-set kernel of n random 3x3 kernels (i.i.d. normal weights:
    no direction preferred, as at initialisation): what a match scores by chance."""
    random_Nx3x3 = np.random.default_rng(seed).standard_normal((n, 3, 3))
    return np.nanmax(np.abs(kernels.similarity(random_Nx3x3).cosine_NxM), axis=1)


def chance_table(best_N: np.ndarray) -> str:
    """Quantiles of the chance best |cosine|, a one-row markdown table."""
    head = " | ".join(f"{q:.0%}" for q in QUANTILES)
    cells = " | ".join(f"{v:.3f}" for v in np.quantile(best_N, QUANTILES))
    rule = "|---" + "|---:" * len(QUANTILES) + "|"
    return f"| quantile | {head} |\n{rule}\n| best \\|cosine\\| | {cells} |"


def first_kernels(params: dict) -> np.ndarray:
    """FIRST_CONV's kernels reading input channel 0: (O, 3, 3)."""
    return np.moveaxis(np.asarray(params[FIRST_CONV]["kernel"])[:, :, 0, :], -1, 0)


def moved_table(initial_Ox3x3: np.ndarray, trained_Ox3x3: np.ndarray) -> str:
    """Per kernel: its best hand-set match at initialisation and after training, the cosine of
    the two kernels (raw) and the change's norm relative to the initial kernel's."""
    before, after = kernels.similarity(initial_Ox3x3), kernels.similarity(trained_Ox3x3)
    flat_before = initial_Ox3x3.reshape(len(initial_Ox3x3), -1)
    flat_after = trained_Ox3x3.reshape(len(trained_Ox3x3), -1)
    norms = np.linalg.norm(flat_before, axis=1)
    cosine = (flat_before * flat_after).sum(1) / (norms * np.linalg.norm(flat_after, axis=1))
    change = np.linalg.norm(flat_after - flat_before, axis=1) / norms
    lines = [
        "| kernel | best match at init | best match trained | cos(init, trained) | change / init |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in range(len(flat_before)):
        matches = f"{before.match(k)} | {after.match(k)}"
        lines.append(f"| ch {k} | {matches} | {cosine[k]:+.3f} | {change[k]:.2f} |")
    return "\n".join(lines)


def tables(run_dir: Path) -> str:
    """The run's first conv against the hand-set kernels, against its initial kernels, the
    chance level and the hand-set pairs."""
    run = trained.load(run_dir)
    learned = first_kernels(run.variables["params"])
    initial = first_kernels(run.recipe.state.params)  # from the run's trainer.seed
    rows = [f"ch {k}" for k in range(len(learned))]
    return (
        f"{FIRST_CONV} of {run_dir} (step {run.step}) against the hand-set kernels:\n\n"
        f"{kernels.similarity(learned).markdown(rows)}\n\n"
        f"The same kernels at initialisation (trainer.seed={run.cfg.trainer.seed}) and after:\n\n"
        f"{moved_table(initial, learned)}\n\n"
        f"Chance: the best |cosine| of {CHANCE_KERNELS:,} random normal 3x3 kernels (seed 0):\n\n"
        f"{chance_table(chance_best(CHANCE_KERNELS))}\n\n"
        "The hand-set kernels against each other:\n\n"
        f"{kernels.hand_set_pairs().markdown(list(kernels.HAND_SET))}\n"
    )


def main() -> None:
    text = tables(Path(sys.argv[1]))
    (RESULTS / "similarity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
