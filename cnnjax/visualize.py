"""`python -m cnnjax.visualize run_dir=<dir> [images=4] [layer=<name>] [unit=[i,j]]
[hand_set_kernels=true]`: pictures of a trained (or checkpointed) run, written into
`<dir>/visualize/` (see `cnnjax.plots.run_pictures` for what each shows)."""

import hydra
from omegaconf import DictConfig

from cnnjax.errors import reported
from cnnjax.plots import run_pictures
from cnnjax.runtime import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="visualize")
def main(cfg: DictConfig) -> None:
    """Entry point; exits with status 2 and the message when the run cannot be visualised."""
    with reported():
        result = run_pictures.draw(**cfg)
    print("\n".join(result.lines))


if __name__ == "__main__":
    main()
