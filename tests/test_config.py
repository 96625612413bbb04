"""The entry point and configs: every experiment composes, --cfg works, multirun runs two jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, REPO, compose
from omegaconf import OmegaConf

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "conceptdistill", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    own = ["concept=[cat]", "prompts.foreground='a photo of a cat'"] if experiment == "folder" else []
    cfg = compose([f"+experiment={experiment}", *own], run_dir=Path("/tmp/unused"))
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert container["stages"]
    assert container["data"]["_target_"]
    for word in container["concept"]:
        assert word in container["prompts"]["foreground"]


def test_paper_experiments_use_the_papers_settings():
    cfg = compose(["experiment=cub_birds"], run_dir=Path("/tmp/unused"))
    assert (cfg.masks.module.num_steps, cfg.masks.module.start_step) == (50, 40)
    assert cfg.finetune.module.learning_rate == pytest.approx(1e-4)
    assert (cfg.segment.image_size, cfg.segment.batch_size, cfg.segment.module.learning_rate) == (128, 32, 2e-3)
    assert cfg.diffusion.name == "sd14" and cfg.experiment == "cub_birds"


def test_the_demo_is_the_recorded_shapes_experiment_with_a_smaller_segmenter():
    """`make demo` (the default experiment) and `make reproduce` (experiment=shapes) differ in the segmenter's
    budget alone, so the demo's upstream rows are the recorded ones and only its U-Net rows are lower."""
    demo = OmegaConf.to_container(compose([], run_dir=Path("/tmp/unused")), resolve=True)
    recorded = OmegaConf.to_container(compose(["experiment=shapes"], run_dir=Path("/tmp/unused")), resolve=True)
    assert (demo.pop("experiment"), recorded.pop("experiment")) == ("shapes_demo", "shapes")
    demo_segment, recorded_segment = demo.pop("segment"), recorded.pop("segment")
    assert demo == recorded
    budget = ("image_size", "max_steps")
    assert [demo_segment[k] for k in budget] == [32, 400] and [recorded_segment[k] for k in budget] == [64, 1200]
    assert {k: v for k, v in demo_segment.items() if k not in (*budget, "module", "checkpoint_every")} == \
        {k: v for k, v in recorded_segment.items() if k not in (*budget, "module", "checkpoint_every")}


def test_cfg_job_prints_the_composed_config():
    result = run_cli("+experiment=shapes", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.experiment == "shapes" and printed.concept == ["circle"]


def test_unknown_stage_is_a_clear_error(tmp_path):
    from conceptdistill.pipeline.registry import StageError
    from conceptdistill.runner import run

    cfg = compose(["stages=[mask]", "logger=none"], run_dir=tmp_path)
    with pytest.raises(StageError, match="unknown stage 'mask'"):
        run(cfg)


def test_multirun_runs_both_jobs(tmp_path):
    result = run_cli("-m", "stages=[report]", "logger=none", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    for job in ("0", "1"):
        results = json.loads((tmp_path / job / "report" / "results.json").read_text())
        assert results["experiment"] == "shapes_demo"
    seeds = {OmegaConf.load(tmp_path / job / ".hydra" / "config.yaml").seed for job in ("0", "1")}
    assert seeds == {0, 1}


def test_slurm_launcher_config_composes():
    """The submitit launcher group resolves (hydra-submitit-launcher is a dev dependency)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["hydra/launcher=slurm", "experiment=cub_birds"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0


def test_configs_ship_inside_the_package():
    """`python -m conceptdistill` finds its configs through the package (conceptdistill/conf), which is
    what an installed wheel carries; pyproject's package-data must include them."""
    import tomllib

    import conceptdistill

    package_conf = Path(conceptdistill.__file__).parent / "conf"
    assert (package_conf / "config.yaml").is_file()
    assert sorted(p.name for p in (package_conf / "experiment").glob("*.yaml")) == sorted(
        p.name for p in (CONF_DIR / "experiment").glob("*.yaml"))
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "conf/**/*.yaml" in package_data["conceptdistill"]


def test_rows_scored_on_another_split_than_test_say_so():
    """With `splits` lacking test, the masks and inpaint rows are scored on another split while the U-Nets are
    scored on test: their labels name the split (they were labelled as test rows)."""
    from conceptdistill.stages.report import table_rows

    on_train = dict(table_rows(compose(["splits=[train]"], run_dir=Path("/tmp/unused"))))
    on_test = dict(table_rows(compose([], run_dir=Path("/tmp/unused"))))
    for key in ("baseline_all_foreground", "baseline_centre_box", "preliminary_masks", "refined_masks"):
        assert on_train[key] == f"{on_test[key]} [train split, not test]"
    assert on_train["unet_refined"] == on_test["unet_refined"] == "U-Net on (D, M)"
