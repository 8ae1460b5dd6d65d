"""Packs: M tiny models of one architecture trained in one process as one batched
computation (issue 14). ``StackedModels`` runs the M Transformers with stacked weights;
``StackedAdamW`` steps them with per-model lr, weight decay, clipping and stop."""
from kcap.pack.optimizer import StackedAdamW
from kcap.pack.stacked import StackedModels

__all__ = ["StackedModels", "StackedAdamW"]
