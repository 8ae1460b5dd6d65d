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


def test_facts_of_a_run_with_mixed_qa_match_what_training_counts():
    """With data.qa_fraction, the counted parameters include the QA blocks' token ids (as
    training counts them) and the tokens include the blocks (~96 per mixed person and
    exposure); plain runs are unchanged."""
    import numpy as np

    from kcap.data.tokenizer import default_tokenizer
    from kcap.experiments.grids import QA_TOKENS_PER_PERSON
    from kcap.models import build_model, parameter_report
    from kcap.run_setup import build_data, trained_token_ids

    # the gpu preset: a mixed biography with its QA block (~224 tokens) needs its window 512
    plain, mixed = (run("gpu", "gpt2-1-1", 600, 1000, seed=3, qa_fraction=f) for f in (0.0, 0.25))
    for r in (plain, mixed):
        _, stream, _ = build_data(r.config)
        truth = parameter_report(build_model(r.config.model, default_tokenizer().vocab_size),
                                 trained_token_ids(stream))["counted"]
        assert run_facts(r)["params"] == truth
    assert run_facts(mixed)["params"] > run_facts(plain)["params"]  # the questions' words
    # tokens: the estimate's QA share against the blocks' real lengths
    ds, stream, _ = build_data(mixed.config)
    qa = stream.dataset
    real = qa.block_lengths(qa.people).sum() * mixed.config.exposures
    extra = run_facts(mixed)["tokens"] - run_facts(plain)["tokens"]
    assert extra == int(150 * mixed.config.exposures * QA_TOKENS_PER_PERSON)
    assert abs(extra - real) < 0.1 * real, (extra, real)
    assert np.all(qa.people < 600) and len(qa.people) == 150
