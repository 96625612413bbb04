"""`python -m conceptdistill [overrides]`: the Hydra entry point.

Only hydra and omegaconf are imported here, so `--help` and `--cfg job` answer quickly; the stages import
torch, diffusers and lightning when they run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


def normalise_overrides(arguments: list[str]) -> list[str]:
    """`+experiment=NAME` read as `experiment=NAME`; `model=NAME` and `model.KEY=...` as `diffusion=NAME` and
    `diffusion.KEY=...`.

    The experiment group has a default (shapes_demo) in the primary config's defaults list, so Hydra accepts only
    `experiment=NAME`; `+experiment=NAME`, the usual spelling for a group that has none, would be refused with
    "Multiple values for experiment". Both spellings mean the same here, so both work. The diffusion-model
    group is `diffusion`; `model` is the name users of other tools reach for first, so it means the same.
    """
    normalised = []
    for arg in arguments:
        if arg.startswith("+experiment="):
            arg = arg[1:]
        for prefix in ("model=", "model.", "+model.", "~model."):
            if arg.startswith(prefix):
                arg = arg.replace("model", "diffusion", 1)
        normalised.append(arg)
    return normalised


# An absolute path: the `conceptdistill` command's caller is not a module of this package, so a path
# relative to it would be looked up as a (non-existent) Python package.
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="config")
def main(cfg: DictConfig) -> dict:
    from conceptdistill.runner import run

    try:
        return run(cfg)
    except user_errors() as err:
        # A setting, a data folder or a model folder this run cannot use: the message says what to do; a
        # traceback through Hydra and Lightning would only bury it. (HYDRA_FULL_ERROR=1 shows it anyway.)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{type(err).__module__}.{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "the inputs or settings are wrong", not "the program is" (imported when needed:
    they pull in torch, which `--help` does not need)."""
    from conceptdistill.checks import SettingsError
    from conceptdistill.data.readers import DatasetLayoutError
    from conceptdistill.diffusion.loading import ModelNotFoundError, UnsupportedModelError
    from conceptdistill.pipeline.registry import StageError

    return SettingsError, DatasetLayoutError, ModelNotFoundError, UnsupportedModelError, StageError


def cli() -> None:
    """The `conceptdistill` command: the same as `python -m conceptdistill`."""
    sys.argv[1:] = normalise_overrides(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
