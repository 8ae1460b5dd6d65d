"""A model's loss and gradients through one implementation path, and the check that two
paths agree: the kernel tests' end-to-end comparison of a kernel against the torch path."""
import pytest
import torch

VOCAB = 97


def loss_and_grads(name: str, ids, targets, device, **impls):
    """(logits, loss, {parameter: grad}) of model ``name`` built under seed 0 with the
    ``attn_impl`` / ``mlp_impl`` / ``loss_impl`` given (torch for the others), on ids
    (B, T) and targets (B, T)."""
    from kcap.models import build_model

    options = {"attn_impl": "torch", "mlp_impl": "torch", "loss_impl": "torch", **impls}
    torch.manual_seed(0)
    model = build_model(name, VOCAB, context=32, **options).to(device)
    logits, loss = model(ids.to(device), targets.to(device))
    loss.backward()
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_same_in_fp32(got, want):
    """(loss, grads) of two fp32 paths that differ by summation order only (a few ulps)."""
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-6)
    for n, g in want[1].items():
        torch.testing.assert_close(got[1][n], g, rtol=1e-4, atol=1e-6, msg=n)
