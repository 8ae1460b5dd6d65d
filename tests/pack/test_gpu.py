"""A pack on a GPU, as the trainer runs it there: CUDA, bf16 autocast, the Triton flash
attention folded over the models, the fused LM head + loss, StackedAdamW's pinned uploads.
Skipped without a GPU; the first check a GPU session makes of packs (bench/gpu_session.sh
tests runs tests/pack).

Tolerance: a pack and its solo models run the same bf16 kernels on the same rows, except
the batched matmuls (bmm vs mm may tile and sum differently). Each bf16 product rounding
moves a logit by ~2^-8 of its size; over a layer's sums that stays ~1% of the loss's
per-token terms, which average out over B * T tokens: the losses may differ by 2% relative
(a wrong head, model or mask moves them by tens of percent).
"""
import pytest
import torch

from kcap.models import build_model
from kcap.pack import StackedAdamW, StackedModels

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a GPU")
V, CONTEXT, B, T = 4337, 128, 4, 128


def models(seeds=(0, 1, 2)):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(build_model("gpt2-2-2", V, context=CONTEXT).cuda())
    return out


def test_pack_losses_match_solo_models_in_bf16():
    solo = models()
    pack = StackedModels(solo)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, V, (3, B, T), device="cuda", generator=g)
    targets = torch.randint(0, V, (3, B, T), device="cuda", generator=g)
    targets[2] = -100  # a finished model: loss 0, no gradient
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, losses = pack(ids, targets)
        want = [m(ids[i], targets[i])[1] for i, m in enumerate(solo[:2])]
    assert logits is None  # the fused loss: no logits formed
    for i in range(2):
        assert losses[i].item() == pytest.approx(want[i].item(), rel=2e-2)
    assert losses[2].item() == 0.0
    losses.sum().backward()
    grads = dict(pack.named_grads())
    assert all(torch.isfinite(gr).all() for gr in grads.values())
    assert all(torch.count_nonzero(gr[2]) == 0 for gr in grads.values())


def test_pack_trains_on_cuda_without_touching_finished_models():
    pack = StackedModels(models())
    opt = StackedAdamW(pack, lr=[1e-3, 2e-3, 3e-3], weight_decay=0.1)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 50, (3, B, T), device="cuda", generator=g)  # a small alphabet: learnable
    first = None
    for step in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, losses = pack(ids[..., :-1], ids[..., 1:])
        losses.sum().backward()
        frozen = pack.flat.detach()[2].clone()
        opt.step([1e-3, 2e-3, 3e-3], [True, True, step < 10])
        opt.zero_grad()
        if step >= 10:
            assert torch.equal(pack.flat.detach()[2], frozen)  # finished at step 10
        first = losses.detach() if first is None else first
    assert (losses.detach()[:2] < first[:2] - 0.5).all()  # both active models learned
    assert opt.steps == [30, 30, 10]
    state = opt.state_for_model(0)
    assert state["param_groups"][0]["fused"] and state["state"][0]["step"].is_cuda
