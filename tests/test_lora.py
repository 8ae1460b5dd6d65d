"""LoRA adapters (kcap/lora.py): a fresh adapter is a no-op, training moves only the
adapters (and only the value rows of attn.kv), merge gives the adapted model's outputs and
unmerge restores the base weights exactly."""
import pytest
import torch

from kcap.lora import LoRALinear, add_lora, lora_parameters, merge_lora, unmerge_lora
from kcap.models import build_model

VOCAB = 97


def model(name="gpt2-2-2", **options):
    torch.manual_seed(0)
    return build_model(name, VOCAB, context=64, **options).eval()


def ids(batch=3, length=37):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["gpt2-2-2", "llama-1-2", "mistral-1-4"])
def test_a_fresh_adapter_changes_nothing(name):
    m, x = model(name), ids()
    before = m(x)[0]
    names = add_lora(m, rank=4, alpha=8)
    assert names and all(isinstance(m.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(m(x)[0], before)  # B = 0: exactly the base model


def train_steps(m, steps=5):
    opt = torch.optim.AdamW(lora_parameters(m), lr=1e-2)
    x = ids()
    for _ in range(steps):
        _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_only_the_adapters_train_and_keys_stay_untouched():
    m = model()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    add_lora(m, rank=4, alpha=8)
    assert all(not p.requires_grad for n, p in m.named_parameters() if not n.endswith((".a", ".b")))
    train_steps(m)
    after = {k.replace(".base.", "."): v for k, v in m.state_dict().items()
             if not k.endswith((".a", ".b"))}
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)  # frozen, bit for bit
    assert all(p.abs().sum() > 0 for p in lora_parameters(m))  # B moved off zero
    kv = m.blocks[0].attn.kv
    rows = m.cfg.kv_heads * m.cfg.head_dim
    delta = kv.delta_weight()
    assert delta[:rows].abs().max() == 0 and delta[rows:].abs().max() > 0  # values, not keys


def test_merge_matches_the_adapted_model_and_unmerge_restores_the_base():
    m = model("llama-1-2")
    add_lora(m, rank=4, alpha=8)
    train_steps(m)
    x = ids()
    adapted = m(x)[0]
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    merge_lora(m)
    merged = m(x)[0]
    # the same sums in another order: fp32 rounding of logits ~1 in magnitude
    assert torch.allclose(merged, adapted, rtol=0, atol=1e-5)
    assert not torch.equal(m.blocks[0].attn.q.base.weight, weights["blocks.0.attn.q.base.weight"])
    unmerge_lora(m)
    assert all(torch.equal(v, weights[k]) for k, v in m.state_dict().items())  # exact
    assert torch.equal(m(x)[0], adapted)


def test_adapted_mlps_take_the_plain_path():
    m = model(mlp_impl="triton")
    add_lora(m, where=("mlp",))
    assert all(b.mlp.impl == "torch" for b in m.blocks)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="rank"):
        add_lora(model(), rank=0)
    with pytest.raises(ValueError, match="alpha"):
        add_lora(model(), alpha=-1)
    with pytest.raises(ValueError, match="where"):
        add_lora(model(), where=("k",))
    with pytest.raises(ValueError, match="MoE"):
        add_lora(model("gpt2moe-1-2"))
    with pytest.raises(TypeError, match="Transformer"):
        add_lora(torch.nn.Linear(3, 3))
    m = model()
    add_lora(m)
    with pytest.raises(ValueError, match="already"):
        add_lora(m)
    with pytest.raises(ValueError, match="rows"):
        LoRALinear(torch.nn.Linear(4, 6), 2, 4.0, rows=(3, 9))


def test_adapters_over_a_quantized_model_train_beside_the_int_weights():
    from kcap.quantize import QuantLinear, quantize_model

    m, x = model(), ids()
    quantize_model(m, 8, "rtn")
    before = m(x)[0]
    add_lora(m, rank=4, alpha=8)
    assert isinstance(m.blocks[0].attn.q.base, QuantLinear)
    assert torch.equal(m(x)[0], before)  # still a no-op
    params = lora_parameters(m)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    m(x)[0].square().mean().backward()
    assert all(p.grad is not None for p in params)
    with pytest.raises(ValueError, match="merge needs a floating-point base layer"):
        merge_lora(m)


@pytest.mark.parametrize("bits", [8, 4])
def test_adapter_gradients_through_the_quant_kernels_match_the_torch_path(bits):
    """The quantized layers' Triton kernels (CUDA's default, here in the interpreter) must
    pass gradients to their input: the adapters of block 0 learn through block 1's
    quantized layers. Before, those kernels returned outputs without a gradient, and the
    adapters got gradients that missed every such path."""
    from kcap.kernels.runtime import INTERPRET
    from kcap.quantize import QuantLinear, quantize_model

    if not (torch.cuda.is_available() or INTERPRET):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, x = model().to(device), ids().to(device)
    quantize_model(m, bits, "rtn", group_size=32)
    add_lora(m, rank=4, alpha=8)
    with torch.no_grad():  # B = 0 would leave A without a gradient
        for p in lora_parameters(m):
            p.normal_(0, 0.1, generator=torch.Generator(device).manual_seed(p.numel()))
    layers = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    grads = {}
    for impl in ("torch", "triton"):
        for layer in layers:
            layer.impl = impl
        m.zero_grad()
        m(x)[0].square().mean().backward()
        grads[impl] = [None if p.grad is None else p.grad.clone() for p in lora_parameters(m)]
    assert all(g is not None for g in grads["triton"] + grads["torch"])
    for got, want in zip(grads["triton"], grads["torch"]):
        # the two paths differ only by fp32 rounding in the forward (~1e-6 relative)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
