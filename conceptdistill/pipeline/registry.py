"""The stage registry: each stage declares itself once, where it is defined, with `@register_stage`.

A declaration names what the stage's results depend on, and the runner derives everything else from it:
- ``settings``: the dotted config keys the stage reads (``"masks"``, ``"prompts.foreground"``), or a function of
  the config giving them (for a stage that reads a key only under some settings). The stage is run with a view
  of the config that holds only these keys (plus the hardware and logging keys every stage may use), so a
  stage cannot read a setting its fingerprint does not cover;
- ``inputs``: the stages whose artifacts it reads (a tuple, or a function of the config for stages whose
  inputs depend on settings, such as `segment`'s mask sources). Their fingerprints are part of its own, so a
  change upstream invalidates everything downstream, and the runner refuses to run a stage whose inputs are
  missing or were made with other settings;
- ``uses_model``: the stage reads the diffusion model's weights; the fingerprint covers their content;
- ``always_run`` (cheap summaries such as `report`) and ``reads_data`` (the data set is checked before any
  stage runs);
- ``rows`` (results-table rows the stage's summary holds under "rows", with their labels, or a function of the
  config giving them, for a label that names a setting), ``scalars`` (results
  beside the table the summary holds under "scalars": a number, or a record {"value": number, counts...}, with
  their labels; a stage that cannot measure one leaves it out, and the report then shows nothing for it, not
  0) and ``figures`` (report figure name -> a glob under the stage's folder): the report collects all three
  from every stage.

The run order of the pipeline (`pipeline_order`) follows from the inputs; adding a stage is one module in
`conceptdistill/stages/` that declares itself, plus its config group.

Keys in `PRESENTATION_KEYS` never enter a fingerprint: batch sizes of prediction stages, worker counts,
figure counts and where files go do not change any result (randomness is per sample, see utils/seeding.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: config keys visible to every stage and never part of a fingerprint (hardware, logging, folders)
INFRASTRUCTURE_KEYS = ("run_dir", "experiment", "trainer", "logger", "paths", "stages", "quiet")
#: keys that cannot change a stage's results; a change to them never invalidates finished work
PRESENTATION_KEYS = frozenset({
    "diffusion.name", "diffusion.family", "diffusion.path", "diffusion.batch_size",
    "data.num_workers", "data.scan_workers",
    "masks.batch_size", "masks.figure_samples", "masks.module.timesteps_per_call",
    "inpaint.batch_size", "inpaint.figure_samples",
    "synthesize.batch_size", "synthesize.figure_samples",
    "segment.figure_samples", "segment.checkpoint_every",
    "finetune.sample_every", "finetune.sample_count", "finetune.sample_steps", "finetune.checkpoint_every",
    "world.checkpoint_every",
    "predict.batch_size", "predict.output_dir",
})  # fmt: skip
#: trainer settings (precision, device count, and any extra Trainer argument such as accumulate_grad_batches)
#: can change numbers; every stage's fingerprint covers them all
PREDICTION_HARDWARE = TRAINING_HARDWARE = ("trainer",)


class StageError(RuntimeError):
    """A stage cannot run as configured; the message says what to do."""


@dataclass(frozen=True)
class StageSpec:
    """One stage's declaration (see the module docstring). `module` and `function` name its run function,
    looked up at call time so that the function can be replaced (tests do)."""

    name: str
    module: str
    function: str
    settings: tuple[str, ...] | Callable[[Any], tuple[str, ...]]
    inputs: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    uses_model: bool = False
    always_run: bool = False
    reads_data: bool = True
    rows: tuple[tuple[str, str], ...] | Callable[[Any], dict[str, str]] = ()
    scalars: tuple[tuple[str, str], ...] = ()
    figures: tuple[tuple[str, str], ...] = ()

    def settings_for(self, cfg) -> tuple[str, ...]:
        return tuple(self.settings(cfg) if callable(self.settings) else self.settings)

    def inputs_for(self, cfg) -> tuple[str, ...]:
        return tuple(self.inputs(cfg) if callable(self.inputs) else self.inputs)

    def rows_for(self, cfg) -> tuple[tuple[str, str], ...]:
        """(key in the summary's "rows", label in the results table) of this stage under `cfg`."""
        return tuple(self.rows(cfg).items()) if callable(self.rows) else self.rows

    @property
    def run(self) -> Callable[[Any], dict]:
        return getattr(importlib.import_module(self.module), self.function)


_REGISTRY: dict[str, StageSpec] = {}


def register_stage(
    name: str, *, settings, inputs=(), uses_model: bool = False, always_run: bool = False,
    reads_data: bool = True, rows: dict[str, str] | Callable[[Any], dict[str, str]] | None = None, scalars: dict[str, str] | None = None,
    figures: dict[str, str] | None = None,
):
    """Decorator for a stage's run function ``run(ctx) -> dict`` (see the module docstring for the arguments).

    Raises:
        ValueError: when another function already registered `name`.
    """

    def register(function):
        spec = StageSpec(
            name=name, module=function.__module__, function=function.__name__,
            settings=settings if callable(settings) else tuple(settings),
            inputs=inputs, uses_model=uses_model, always_run=always_run, reads_data=reads_data,
            rows=rows if callable(rows) else tuple((rows or {}).items()), scalars=tuple((scalars or {}).items()),
            figures=tuple((figures or {}).items()),
        )
        known = _REGISTRY.get(name)
        if known is not None and (known.module, known.function) != (spec.module, spec.function):
            raise ValueError(f"stage {name!r} is registered twice: by {known.module}.{known.function} and "
                             f"{spec.module}.{spec.function}")
        _REGISTRY[name] = spec
        return function

    return register


def stage_spec(name: str) -> StageSpec:
    """The declaration of stage `name`, importing its module ``conceptdistill.stages.<name>`` on first use.

    Raises:
        StageError: for a name that is not a stage, listing the stages there are.
    """
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"conceptdistill.stages.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"conceptdistill.stages.{name}":
                raise
    if name not in _REGISTRY:
        raise StageError(f"unknown stage {name!r}; choose from {', '.join(known_stages())} (e.g. stages=[masks,finetune])")
    return _REGISTRY[name]


def known_stages() -> list[str]:
    """Every registered stage: those of this package's `stages/` modules, and any registered elsewhere."""
    import pkgutil

    package = importlib.import_module("conceptdistill.stages")  # found at run time, as the stages are
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _REGISTRY:
            importlib.import_module(f"conceptdistill.stages.{info.name}")
    return sorted(_REGISTRY)


def pipeline_order(cfg) -> list[str]:
    """Every stage that writes results (not always-run ones), each after the stages it reads (ties: by name).

    Raises:
        StageError: when the declared inputs form a cycle.
    """
    producing = [name for name in known_stages() if not _REGISTRY[name].always_run]
    waiting = {name: set(_REGISTRY[name].inputs_for(cfg)) & set(producing) for name in producing}
    order: list[str] = []
    while waiting:
        ready = sorted(name for name, needs in waiting.items() if needs <= set(order))
        if not ready:
            raise StageError(f"the inputs of stages {sorted(waiting)} form a cycle")
        order.append(ready[0])
        del waiting[ready[0]]
    return order
