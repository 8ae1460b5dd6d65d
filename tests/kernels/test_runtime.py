"""dot_precision follows torch's fp32 matmul setting (IEEE by default, TF32 when asked)."""
import pytest
import torch

from kcap.kernels.runtime import dot_precision


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
