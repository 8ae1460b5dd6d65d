"""Every architecture builds from its name, is causal, counts its parameters right, and the
pieces (rotary, GQA attention, dispatch) match their plain definitions."""
import math

import pytest
import torch

from kcap.models import build_model, model_config, parameter_report
from kcap.models.config import mistral_kv_heads
from kcap.models.transformer import ATTENTION, apply_rotary, rotary_tables, torch_attention

V = 300
NAMES = ["gpt2-2-2", "gpt2quarter-2-2", "gpt2nomlp-2-2", "gpt2moe-2-2", "llama-2-2",
         "llamaplain-2-2", "mistral-2-4"]


@pytest.mark.parametrize("name", NAMES)
def test_builds_runs_backward_and_is_causal(name):
    torch.manual_seed(0)
    model = build_model(name, V, context=32)
    x = torch.randint(0, V, (2, 20))
    logits, loss = model(x, x)
    assert logits.shape == (2, 20, V) and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()  # MoE: test capacity factor, so no token is dropped in either pass
    with torch.no_grad():
        base = model(x)[0]
        y = x.clone()
        y[:, 12:] = (y[:, 12:] + 1) % V  # change the future only
        torch.testing.assert_close(model(y)[0][:, :12], base[:, :12])
        assert not torch.allclose(model(y)[0][:, 12:], base[:, 12:])


def test_architecture_details():
    d = 64 * 4
    gpt2 = build_model("gpt2-1-4", V)
    assert gpt2.lm_head.weight is gpt2.wte.weight and gpt2.cfg.rotary_dims == 16
    assert gpt2.blocks[0].mlp.up.out_features == 4 * d and gpt2.blocks[0].mlp.up.bias is not None
    llama = build_model("llama-1-4", V)
    assert llama.lm_head.weight is not llama.wte.weight and llama.cfg.rotary_dims == 64
    mlp = llama.blocks[0].mlp
    assert sum(p.numel() for p in mlp.parameters()) == pytest.approx(8 * d * d, rel=0.01)
    mistral = build_model("mistral-1-4", V)
    mlp = mistral.blocks[0].mlp
    assert sum(p.numel() for p in mlp.parameters()) == pytest.approx(10.5 * d * d, rel=0.01)
    assert mistral.cfg.kv_heads == 1  # 4 heads: groups of 4
    assert build_model("llama-1-4", V, tied=True).lm_head.weight is not None
    assert build_model("llamaplain-1-4", V).blocks[0].mlp.kind == "silu"
    assert build_model("gpt2quarter-1-4", V).blocks[0].mlp.up.out_features == d
    assert build_model("gpt2nomlp-1-4", V).blocks[0].mlp is None
    moe = build_model("gpt2moe-1-4", V)
    assert moe.blocks[0].mlp.w1.shape == (32, d, d) and moe.cfg.top_k == 1
    pos = build_model("gpt2-1-4", V, learned_pos=True, rotary_fraction=0.0)
    assert pos.wpe is not None and pos.cfg.rotary_dims == 0


@pytest.mark.parametrize("heads, kv", [(8, 2), (12, 3), (6, 3), (10, 5), (5, 5), (1, 1)])
def test_mistral_kv_rule(heads, kv):
    assert mistral_kv_heads(heads) == kv
    assert model_config(f"mistral-2-{heads}", V).kv_heads == kv


def test_parameter_report():
    used = list(range(0, V, 3))
    m = build_model("gpt2-2-2", V)
    r = parameter_report(m, used)
    d = 128
    assert r["total"] == sum(p.numel() for p in m.parameters())  # tied weight counted once
    assert r["total"] - r["counted"] == (V - len(used)) * d
    assert r["active"] == r["total"]
    moe = build_model("gpt2moe-2-2", V)
    r = parameter_report(moe, used)
    per_expert = 2 * d * d + 2 * d
    assert r["total"] - r["active"] == 2 * 31 * per_expert  # 2 layers, 31 idle experts each
    llama = parameter_report(build_model("llama-1-2", V), used)
    assert llama["total"] - llama["counted"] == 2 * (V - len(used)) * d  # untied: both tables
    # The paper: GPT2-12-12 counts ~88M parameters on bioS (embedding rows of used tokens).
    from kcap.data.bios import BioS, BioSConfig
    ds = BioS(BioSConfig(n=1000))
    big = parameter_report(build_model("gpt2-12-12", ds.tokenizer.vocab_size), ds.used_token_ids())
    assert 85e6 < big["counted"] < 90e6


@pytest.mark.parametrize("name, options, message", [
    ("gpt3-2-2", {}, "unknown model name"),
    ("gpt2-2", {}, "unknown model name"),
    ("gpt2-2-4", {"n_kv_head": 3}, "must divide n_head"),
    ("gpt2-2-4", {"rotary_fraction": 1.5}, "rotary_fraction"),
    ("gpt2-2-4", {"attn_impl": "cuda"}, "attn_impl"),
    ("gpt2-2-4", {"loss_impl": "liger"}, "loss_impl must be one of"),
    ("gpt2-2-4", {"flash": True}, "unknown model options"),
    ("gpt2moe-2-4", {"top_k": 33}, "top_k"),
    ("gpt2-0-4", {}, "n_layer"),
])
def test_bad_configs_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        model_config(name, V, **options)


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="context"):
        build_model("gpt2-1-2", V, context=8)(torch.zeros(1, 9, dtype=torch.long))


def test_rotary_depends_only_on_relative_position():
    torch.manual_seed(1)
    cos, sin = rotary_tables(64, 16, 10_000.0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def at(x, pos):  # x placed at position pos
        seq = torch.zeros(1, 1, pos + 1, 32)
        seq[:, :, pos] = x[:, :, 0]
        return apply_rotary(seq, cos, sin)[:, :, pos]

    s1 = (at(q, 10) * at(k, 3)).sum()
    s2 = (at(q, 40) * at(k, 33)).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s1, (at(q, 10) * at(k, 4)).sum())
    torch.testing.assert_close(at(q, 5)[..., 16:], q[:, :, 0, 16:])  # non-rotary dims untouched
    assert math.isclose(at(q, 7).norm().item(), q.norm().item(), rel_tol=1e-5)


@pytest.mark.parametrize("heads, kv", [(4, 4), (4, 2), (8, 1)])
def test_gqa_attention_matches_expanded_kv(heads, kv):
    torch.manual_seed(2)
    q = torch.randn(2, heads, 9, 16)
    k, v = torch.randn(2, kv, 9, 16), torch.randn(2, kv, 9, 16)
    rep = heads // kv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    torch.testing.assert_close(torch_attention(q, k, v), ref)


def test_attention_dispatch_point_is_used(monkeypatch):
    calls = []

    def spy(q, k, v):
        calls.append(q.shape)
        return torch_attention(q, k, v)

    monkeypatch.setitem(ATTENTION, "torch", spy)
    build_model("llama-2-2", V)(torch.zeros(1, 5, dtype=torch.long))
    assert len(calls) == 2


def test_dense_mlp_auto_takes_the_torch_path_even_where_kernels_are_the_default(monkeypatch):
    """mlp_impl "auto" runs dense MLPs on eager matmuls on every device (the fused MLP lost
    to them at every shape measured on an H100), while attention's "auto" stays the kernel
    on CUDA and an explicit "triton" still selects the fused MLP. CUDA is simulated by
    making resolve_impl answer as it does for CUDA tensors."""
    from kcap.models import transformer as tr

    monkeypatch.setattr(tr, "resolve_impl", lambda impl, x: "triton" if impl == "auto" else impl)
    used = []
    for name in ("torch", "triton", "split"):
        monkeypatch.setitem(tr.MLP_FORWARD, name, lambda mlp, x, name=name: used.append(name) or x)
    monkeypatch.setitem(ATTENTION, "triton", lambda q, k, v: used.append("attention") or v)
    ids = torch.zeros(1, 5, dtype=torch.long)
    build_model("gpt2-2-2", V)(ids)
    assert used == ["attention", "torch"] * 2
    used.clear()
    build_model("llama-1-2", V, mlp_impl="triton")(ids)
    assert used == ["attention", "triton"]
