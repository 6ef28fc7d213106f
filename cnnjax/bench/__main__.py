"""`python -m cnnjax.bench [bench.mode=throughput|time_to_accuracy] [bench.reference=torch|null]
...`: writes `bench.output` (JSON) and prints it (see `cnnjax.bench`)."""

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnnjax.bench import measure
from cnnjax.errors import reported
from cnnjax.runtime import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    with reported():
        result = measure(cfg, HydraConfig.get().runtime.choices["model"])
    Path(cfg.bench.output).write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(f"written to {cfg.bench.output}")


if __name__ == "__main__":
    main()
