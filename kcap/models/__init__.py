"""Models: ``build_model('gpt2-12-12', vocab_size)`` and the parameter report."""
from __future__ import annotations

from kcap.models.config import ModelConfig, model_config


def build_model(name_or_config, vocab_size: int | None = None, **overrides):
    """A Transformer from a preset name (with ``vocab_size``) or a ModelConfig."""
    from kcap.models.transformer import Transformer

    if isinstance(name_or_config, ModelConfig):
        return Transformer(name_or_config)
    if vocab_size is None:
        raise ValueError("vocab_size is required with a preset name")
    return Transformer(model_config(name_or_config, vocab_size, **overrides))


def parameter_report(model, used_token_ids) -> dict:
    """Total, counted-for-capacity and active parameters (see kcap.capacity for the rules).

    Active: what one token uses: all but the (E - k) experts it is not routed to.
    """
    from kcap.capacity import PARAM_CONVENTION, count_params
    from kcap.models.moe import MoE

    cfg = model.cfg
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    counted = count_params(model, used_token_ids, cfg.vocab_size)
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p[0].numel() for p in (m.w1, m.b1, m.w2, m.b2))
            inactive += (cfg.n_experts - cfg.top_k) * per_expert
    return {"total": total, "counted": counted, "active": total - inactive,
            "convention": PARAM_CONVENTION}


__all__ = ["ModelConfig", "model_config", "build_model", "parameter_report"]
