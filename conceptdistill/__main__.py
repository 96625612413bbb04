"""`python -m conceptdistill [overrides]`: the Hydra entry point.

Only hydra and omegaconf are imported here, so `--help` and `--cfg job` answer quickly; the stages import
torch, diffusers and lightning when they run.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


def normalise_overrides(arguments: list[str]) -> list[str]:
    """`+experiment=NAME` read as `experiment=NAME`.

    The experiment group has a default (shapes) in the primary config's defaults list, so Hydra accepts only
    `experiment=NAME`; `+experiment=NAME`, the usual spelling for a group that has none, would be refused with
    "Multiple values for experiment". Both spellings mean the same here, so both work.
    """
    return [arg[1:] if arg.startswith("+experiment=") else arg for arg in arguments]


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from conceptdistill.runner import run

    return run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = normalise_overrides(sys.argv[1:])
    main()
