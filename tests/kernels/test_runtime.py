"""dot_precision follows torch's fp32 matmul setting (IEEE by default, TF32 when asked);
trial autotuning candidates join the lists only when asked for."""
import pytest
import torch

from kcap.kernels import runtime
from kcap.kernels.runtime import config, configs, describe, dot_precision, is_trial


@pytest.fixture
def restore_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_fp32_follows_torch_setting(restore_precision):
    torch.set_float32_matmul_precision("highest")
    assert dot_precision(torch.float32) == "ieee"
    for setting in ("high", "medium"):
        torch.set_float32_matmul_precision(setting)
        assert dot_precision(torch.float32) == "tf32"


def test_half_precision_operands_use_the_tensor_cores(restore_precision):
    torch.set_float32_matmul_precision("highest")
    assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "tf32"


@pytest.mark.parametrize("interpret, autotune, trial, expected", [
    (False, True, False, "candidates"), (False, True, True, "both"),
    (True, True, True, "first"), (False, False, True, "first")])
def test_trial_candidates_join_only_when_asked(monkeypatch, interpret, autotune, trial, expected):
    monkeypatch.setattr(runtime, "INTERPRET", interpret)
    monkeypatch.setattr(runtime, "AUTOTUNE", autotune)
    monkeypatch.setattr(runtime, "TRIAL", trial)
    candidates = [config(BLOCK=64), config(BLOCK=128, num_warps=8)]
    trials = [config(BLOCK=256, num_warps=8, num_stages=4)]
    got = configs(candidates, trials)
    assert got == {"candidates": candidates, "both": candidates + trials,
                   "first": candidates[:1]}[expected]
    assert is_trial(trials[0]) and not any(map(is_trial, candidates))
    assert describe(trials[0]) == "BLOCK=256, 8 warps, 4 stages (trial)"
    assert describe(candidates[0]) == "BLOCK=64, 4 warps, 2 stages"


def test_kernel_trials_are_registered_and_new():
    """Each kernel's trials are marked as such (bench registers labels them so) and none
    repeats a candidate already in its list."""
    from kcap.kernels import attention as A
    from kcap.kernels import gated_mlp as G

    for candidates, trials in ((A.FWD_CANDIDATES, A.FWD_TRIALS), (A.BWD_CANDIDATES, A.BWD_TRIALS),
                               (G.GEMM_CANDIDATES, G.GEMM_TRIALS)):
        assert trials and all(map(is_trial, trials)) and not any(map(is_trial, candidates))
        assert not {describe(c) for c in candidates} & {describe(c).removesuffix(" (trial)")
                                                          for c in trials}
