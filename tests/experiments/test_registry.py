"""Every experiment's grid expands and validates at every preset, and its cost prints."""
import dataclasses

import pytest

from kcap.experiments import registry
from kcap.experiments.catalog import cost, list_text
from kcap.experiments.grids import run, run_facts
from kcap.experiments.spec import Experiment, PostStep, Run
from kcap.run_config import TrainConfig

KEYS = [f"r{i}" for i in range(1, 13)]


def test_the_twelve_headline_results_are_registered():
    assert list(registry.EXPERIMENTS) == KEYS


@pytest.mark.parametrize("key", KEYS)
def test_every_preset_expands_into_valid_runs_with_a_cost(key):
    e = registry.get(key)
    for preset in ("smoke", "gpu", "paper"):
        runs = e.grid(preset)
        assert runs, f"{key} {preset} is empty"
        assert len({r.name for r in runs}) == len(runs)
        for r in runs:
            assert isinstance(r.config, TrainConfig)  # built, so every field was checked
            assert {"model", "arch", "n", "exposures"} <= set(r.labels)
        c = cost(key, preset)
        assert c["runs"] == len(runs) and c["tokens"] > 0 and c["seconds"] > 0
    smoke = cost(key, "smoke")
    assert smoke["seconds"] < 300, "a smoke experiment must stay within minutes on a CPU"
    assert all(r.config.window == 128 for r in e.grid("smoke"))


def test_gpu_grids_cross_the_capacity_boundary():
    """r1 and r4 at the gpu preset hold models on both sides of R_max = 2 (r1) / 1 (r4)."""
    for key, law in (("r1", 2.0), ("r4", 1.0)):
        r_max = [run_facts(r)["R_max"] for r in registry.get(key).grid("gpu")]
        assert min(r_max) < law < max(r_max)


def test_list_prints_every_experiment_and_preset():
    text = list_text()
    for key in KEYS:
        assert f"\n{key} " in "\n" + text
    assert text.count(" smoke ") == 12 and text.count(" paper ") == 12


def test_impossible_runs_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="data.d must be <= t \\*\\* l"):
        run("smoke", "gpt2-1-1", 100, 1000, kind="bioD", k=2, c=2, d=500, l=1, t=20)
    with pytest.raises(ValueError, match="model"):
        run("smoke", "gpt3-1-1", 100, 1000)
    with pytest.raises(ValueError, match="preset"):
        run("laptop", "gpt2-1-1", 100, 1000)
    with pytest.raises(ValueError, match="unknown experiment"):
        registry.get("r13")
    with pytest.raises(ValueError, match="presets"):
        registry.get("r1").grid("huge")
    with pytest.raises(ValueError, match="run name"):
        Run("Has Space", TrainConfig())
    with pytest.raises(ValueError, match="unknown options"):
        PostStep("int4", "quantize", {"bitz": 4})
    with pytest.raises(ValueError, match="kind"):
        PostStep("prune", "prune")


def test_a_grid_with_repeated_names_is_refused():
    e = registry.get("r1")
    twice = dataclasses.replace(e, grids={"smoke": lambda: e.grid("smoke") * 2})
    assert isinstance(twice, Experiment)
    with pytest.raises(ValueError, match="names repeat"):
        twice.grid("smoke")
