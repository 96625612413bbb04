"""The package's shape, read from its own source: which way imports run, module sizes, and that adding a
stage is one module plus its config group (a toy stage runs through the real runner and report)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from conftest import compose
from test_end_to_end import TINY_STEPS

PACKAGE = Path(__file__).resolve().parents[1] / "conceptdistill"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports module a.b.c when there is one, else a name of a.b
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    known = package_modules()
    return {name: imported_modules(path, known) - {name} for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_stages_never_import_each_other_and_nothing_imports_a_stage():
    """Stages meet in the run folder (pipeline/layout.py); the runner finds them through the registry."""
    offending = []
    for source, targets in import_graph().items():
        for target in targets:
            if target.startswith("conceptdistill.stages."):
                offending.append(f"{source} -> {target}")
    assert offending == []


@pytest.mark.parametrize("package, forbidden", [
    # LightningModules know neither run folders, configs nor stages
    ("conceptdistill.modules", ("conceptdistill.stages", "conceptdistill.runner", "conceptdistill.pipeline.context",
                                "conceptdistill.pipeline.layout", "conceptdistill.pipeline.registry")),
    # evaluation knows the layout (through the context it is given) and pure scoring, not stages or models
    ("conceptdistill.evaluation", ("conceptdistill.stages", "conceptdistill.modules", "conceptdistill.runner")),
    # the pure mask maths and metrics import nothing of the package's I/O or models
    ("conceptdistill.maskmath", ("conceptdistill.",)),
    ("conceptdistill.metrics", tuple(f"conceptdistill.{name}" for name in (
        "data", "diffusion", "modules", "pipeline", "stages", "runner", "evaluation", "world", "utils", "figures"))),
    # the diffusion and data layers stand below the pipeline
    ("conceptdistill.diffusion", ("conceptdistill.stages", "conceptdistill.pipeline", "conceptdistill.modules")),
    ("conceptdistill.data", ("conceptdistill.stages", "conceptdistill.pipeline", "conceptdistill.modules")),
])
def test_imports_run_one_way(package, forbidden):
    offending = [f"{source} -> {target}" for source, targets in import_graph().items()
                 if source == package or source.startswith(package + ".")
                 for target in targets if target.startswith(forbidden)]
    assert offending == []


def test_every_module_is_under_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in package_modules().items()}
    assert {name: lines for name, lines in sizes.items() if lines >= MAX_LINES} == {}


# ----- a new stage is one module plus its config group ----------------------------------------------------
TOY_MODULE = '''
"""Stage "toy": the foreground fraction of each M_pre, to show what a new stage needs."""
import numpy as np

from conceptdistill.figures import save_grid
from conceptdistill.pipeline.registry import register_stage


@register_stage("toy", inputs=("masks",), settings=("toy", "splits"),
                rows={"toy_fraction": "toy: M_pre foreground fraction"}, figures={"toy.png": "toy.png"})
def run_toy(ctx):
    store = ctx.layout.mask_store(ctx.cfg.splits[-1])
    masks = [store.load("mask", sid) for sid in store.ids("mask")]
    fraction = float(np.mean([m.mean() for m in masks])) * ctx.cfg.toy.scale
    save_grid(ctx.stage_dir("toy") / "toy.png", {"M_pre": masks[:2]})
    return {"rows": {"toy_fraction": {"acc": fraction, "iou": fraction, "miou": fraction}}}
'''
TOY_CONFIG = "# Stage \"toy\" (a test's example)\nscale: 1.0\n"


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    """Writes the toy stage's module into the stages package and its config group into a config folder on
    Hydra's search path; both are removed afterwards."""
    import importlib
    import sys

    from conceptdistill.pipeline import registry

    module_path = PACKAGE / "stages" / "toy.py"
    assert not module_path.exists()
    module_path.write_text(TOY_MODULE)
    (tmp_path / "conf" / "toy").mkdir(parents=True)
    (tmp_path / "conf" / "toy" / "default.yaml").write_text(TOY_CONFIG)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the toy leaves no trace
    importlib.invalidate_caches()
    try:
        yield [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+toy=default"]
    finally:
        module_path.unlink()
        sys.modules.pop("conceptdistill.stages.toy", None)


@pytest.mark.usefixtures("single_thread")
def test_a_new_stage_is_one_module_plus_its_config_group(toy_stage, tiny_model, tmp_path):
    from conceptdistill.pipeline.registry import pipeline_order
    from conceptdistill.runner import run

    run_dir = tmp_path / "run"
    base = [f"diffusion.path={tiny_model}", "data.num_train=4", "data.num_test=4", "logger=none", *TINY_STEPS, *toy_stage]
    summaries = run(compose([*base, "stages=[masks,toy,report]"], run_dir=run_dir))
    fraction = summaries["toy"]["rows"]["toy_fraction"]["iou"]
    assert 0 < fraction < 1
    order = pipeline_order(compose(base))
    assert order.index("masks") < order.index("toy")  # ordered by what it reads
    report = (run_dir / "report" / "results.md").read_text()
    assert f"| toy: M_pre foreground fraction | {100 * fraction:.1f} |" in report
    assert (run_dir / "report" / "toy.png").exists()

    # its own setting reruns it alone; an upstream setting reruns it too (its fingerprint covers its inputs)
    again = run(compose([*base, "stages=[masks,toy]", "toy.scale=2"], run_dir=run_dir))
    assert again["toy"]["rows"]["toy_fraction"]["iou"] == pytest.approx(2 * fraction)
    assert again["masks"] == summaries["masks"]  # skipped: read from DONE.json
    from conceptdistill.pipeline.context import RunContext

    ctx = RunContext(compose([*base, "toy.scale=2", "masks.module.filter_size=5"], run_dir=run_dir))
    assert not ctx.is_complete("toy")
    assert np.isfinite(fraction)
