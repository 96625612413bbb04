"""`python -m conceptdistill [overrides]`: the Hydra entry point.

Only hydra and omegaconf are imported here, so `--help` and `--cfg job` answer quickly; the stages import
torch, diffusers and lightning when they run.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from conceptdistill.runner import run

    return run(cfg)


if __name__ == "__main__":
    main()
