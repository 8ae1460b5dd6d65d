"""The error rule's machinery (precision.py): its arithmetic rounds where it says it does, and
the bound is the formula the kernel tests rely on."""
import pytest
import torch

from .precision import EXACT, at, error_bound, margin, round_to_tf32, ulp

ONE = 1.0
U32 = 2.0 ** -24


def test_matmul_sums_in_order_with_separate_roundings():
    # 1 + u + u in fp32: each addition alone rounds back to 1 (a tie, to even); any order that
    # adds the two u first would give 1 + 2u. The fp64 reference keeps them.
    a = torch.tensor([[ONE, U32, U32]])
    b = torch.ones(3, 1)
    assert at(torch.float32).matmul(a, b).item() == 1.0
    assert EXACT.matmul(a, b).item() == 1.0 + 2 * U32
    assert at(torch.float32).sum(a, 1).item() == 1.0
    assert at(torch.float32).matmul(a, b).dtype == torch.float32


def test_matmul_rounds_each_product_before_adding_it():
    # (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 rounds to 1 + 2^-11 in fp32, so c + a * a = 0 when the
    # product is rounded first; a fused multiply-add would keep 2^-24.
    a, c = 1.0 + 2.0 ** -12, -(1.0 + 2.0 ** -11)
    lhs, rhs = torch.tensor([[1.0, a]]), torch.tensor([[c], [a]])
    assert at(torch.float32).matmul(lhs, rhs).item() == 0.0
    assert EXACT.matmul(lhs.double(), rhs.double()).item() == 2.0 ** -24


def test_round_goes_through_the_storage_dtype():
    x = torch.tensor([1.0 + 2.0 ** -12], dtype=torch.float32)
    assert at(torch.float16).round(x).item() == 1.0  # below half an fp16 ulp
    assert at(torch.float32).round(x).item() == 1.0 + 2.0 ** -12
    assert EXACT.round(x.double()).item() == 1.0 + 2.0 ** -12


def test_transcendentals_round_once_from_fp64():
    x = torch.tensor([0.5], dtype=torch.float32)
    want = torch.tensor(0.5, dtype=torch.float64).exp().float().item()
    assert at(torch.float32).fn(torch.exp, x).item() == want


def test_tf32_keeps_ten_mantissa_bits_rounding_to_nearest_even():
    x = torch.tensor([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -20, -3.0, 2.0 ** -10])
    assert round_to_tf32(x).tolist() == [1.0, 1.0 + 2.0 ** -9, 1.0 + 2.0 ** -10, -3.0, 2.0 ** -10]


def test_bound_is_twice_the_model_error_plus_one_ulp_at_each_scale():
    exact = torch.tensor([2.0, -4.0], dtype=torch.float64)
    model = exact + torch.tensor([1e-3, -3e-3], dtype=torch.float64)
    magnitude = torch.tensor([10.0, 8.0], dtype=torch.float64)
    want = 2 * 3e-3 + ulp(torch.float16) * 4.0 + ulp(torch.float32) * 10.0
    assert error_bound(exact, model, magnitude, torch.float16) == pytest.approx(want, rel=1e-12)
    got = (exact + want / 2).half()
    assert margin(got, exact, model, magnitude) == pytest.approx(
        (got.double() - exact).abs().max().item() / want, rel=1e-12)


def test_margin_when_the_bound_is_zero():
    zero = torch.zeros(3, dtype=torch.float64)
    assert margin(zero.float(), zero, zero, zero) == 0.0
    assert margin(torch.tensor([0.0, 1e-30, 0.0]), zero, zero, zero) == float("inf")


def test_bad_input():
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype must be"):
        ulp(torch.int32)
    with pytest.raises(TypeError, match="dtype must be"):
        at(torch.float64)
    with pytest.raises(TypeError, match="float32 tensor"):
        round_to_tf32(x)
    with pytest.raises(ValueError, match="exact's shape"):
        error_bound(x, torch.zeros(3, dtype=torch.float64), x, torch.float32)
    with pytest.raises(TypeError, match="model must be"):
        error_bound(x, [0.0, 0.0], x, torch.float32)
    with pytest.raises(ValueError, match="got has shape"):
        margin(torch.zeros(3), x, x, x)
