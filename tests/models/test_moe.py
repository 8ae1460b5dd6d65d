"""The plain torch router against a brute-force reference, and the MoE layer against a
dense computation."""
import math

import pytest
import torch

from kcap.models import build_model
from kcap.models.moe import torch_route


def brute_force(logits, k, factor):
    T, E = logits.shape
    probs = torch.softmax(logits.float(), -1)
    choices = []
    for t in range(T):
        ranked = sorted(range(E), key=lambda e: (-probs[t, e].item(), e))  # ties: lower id
        choices.append(ranked[:k])
    capacity = math.ceil(factor * T * k / E)
    filled = [0] * E
    position = [[0] * k for _ in range(T)]
    for j in range(k):
        for t in range(T):
            e = choices[t][j]
            position[t][j] = filled[e]
            filled[e] += 1
    return choices, position, capacity


@pytest.mark.parametrize("T, E, k, factor", [(17, 4, 1, 1.0), (33, 8, 2, 1.25), (5, 3, 3, 1.0),
                                             (1, 4, 1, 2.0), (12, 1, 1, 0.5), (40, 32, 1, 2.0)])
def test_router_matches_brute_force(T, E, k, factor):
    torch.manual_seed(T + E)
    logits = torch.randn(T, E)
    logits[::3, 0] = logits[::3, -1]  # ties
    r = torch_route(logits, k, factor)
    choices, position, capacity = brute_force(logits, k, factor)
    assert r.capacity == capacity
    assert r.expert.tolist() == choices
    assert r.position.tolist() == position
    assert r.keep.tolist() == [[p < capacity for p in row] for row in position]
    assert r.counts.tolist() == [sum(1 for t in range(T) for j in range(k)
                                     if choices[t][j] == e and position[t][j] < capacity) for e in range(E)]
    if k > 1:
        torch.testing.assert_close(r.gate.sum(-1), torch.ones(T))


def test_router_edge_cases():
    r = torch_route(torch.zeros(0, 4), 1, 2.0)
    assert r.expert.shape == (0, 1) and r.counts.tolist() == [0, 0, 0, 0]
    uniform = torch_route(torch.zeros(8, 4), 1, 2.0)
    assert uniform.expert.flatten().tolist() == [0] * 8  # all tie: lowest id
    assert uniform.aux_loss.item() == pytest.approx(4 * 1.0 * 0.25)  # E * f_0 * P_0
    with pytest.raises(ValueError, match="k must be"):
        torch_route(torch.zeros(3, 4), 5, 1.0)
    with pytest.raises(ValueError, match="shape"):
        torch_route(torch.zeros(3), 1, 1.0)


def test_moe_equals_dense_mixture_when_every_expert_is_used():
    torch.manual_seed(0)
    model = build_model("gpt2moe-1-1", 50, n_experts=4, top_k=4)
    moe = model.blocks[0].mlp.eval()
    x = torch.randn(2, 7, 64)
    probs = torch.softmax(moe.router(x).float(), -1)
    expert_out = torch.stack([torch.nn.functional.gelu(x @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e]
                              for e in range(4)], -1)
    torch.testing.assert_close(moe(x), (expert_out * probs[..., None, :]).sum(-1), rtol=1e-5, atol=1e-6)


def test_dropped_tokens_pass_through_as_zero_mlp_output():
    torch.manual_seed(0)
    model = build_model("gpt2moe-1-1", 50, n_experts=2, top_k=1, capacity_factor_train=0.25)
    moe = model.blocks[0].mlp.train()
    out = moe(torch.randn(1, 16, 64))
    r = moe.last_routing
    dropped = ~r.keep[:, 0]
    assert dropped.any() and (out.view(16, 64)[dropped] == 0).all()
