"""What a training run is: its configuration as dataclasses (TOML files map onto them, see
kcap.config_file). A run is a pure function of a TrainConfig (and the seeds it holds).

Both dataclasses check every field when constructed (type against the annotation, then the
allowed range), so a bad value is refused before any data is generated or any step is
trained, from the Python API as from a TOML file; messages name the key ('data.marker').
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kcap.data.arguments import check_int
from kcap.data.biod import MAX_K
from kcap.data.bios import parse_variant
from kcap.data.pools import N_FULL_NAMES
from kcap.field_types import check_fields, check_mapping
from kcap.models.config import ModelConfig, model_config

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DATA_KINDS = ("bioS", "bioD", "bioR")
MAX_QA_FRACTION = 0.5  # the other half of the people is kept for the QA test (kcap qa)
MAX_SEED = 2**63 - 1  # seeds are hashed as 64-bit words: larger ones would wrap to others


@dataclass
class DataConfig:
    kind: str = "bioS"          # bioS | bioD | bioR (imported rewrites of bioS)
    n: int = 1000
    variant: str = "online"     # bioS variants (see kcap.data.bios)
    k: int = 4                  # bioD parameters
    c: int = 2
    d: int = 100
    l: int = 2  # noqa: E741
    t: int = 50
    junk_n: int = 0             # > 0: mix in junk bioS(junk_n) windows
    junk_ratio: tuple[int, int] = (1, 7)  # useful:junk tokens
    marker: bool = False        # prepend <|useful|> to useful biographies
    qa_fraction: float = 0.0    # people whose QA pairs are mixed into pretraining (Part 3.1)
    bior: str = ""              # bioR: the folder written by `kcap data import-bior`
    seed: int = 0

    def __post_init__(self):
        check_fields(self, "data")
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}")
        check_int("data.n", self.n, 1, N_FULL_NAMES)
        try:
            parse_variant(self.variant)
        except ValueError as err:
            raise ValueError(f"data.variant: {err}") from None
        check_int("data.k", self.k, 1, MAX_K)
        for name in ("c", "l", "t"):
            check_int(f"data.{name}", getattr(self, name), 1)
        check_int("data.d", self.d, 1)
        if not _power_at_least(self.t, self.l, self.d):
            raise ValueError(f"data.d must be <= t ** l (distinct chunks of l = {self.l} symbols "
                             f"over an alphabet of t = {self.t}), got {self.d:,}")
        check_int("data.junk_n", self.junk_n, 0)
        if self.n + self.junk_n > N_FULL_NAMES:
            raise ValueError(f"data.n + data.junk_n must be <= N0 = {N_FULL_NAMES:,} distinct full "
                             f"names, got {self.n + self.junk_n:,}")
        if self.kind != "bioR" and self.bior:
            raise ValueError(f"data.bior names imported bioR rewrites; set data.kind = 'bioR' "
                             f"to use them (data.kind is {self.kind!r})")
        if self.kind == "bioR" and not self.bior:
            raise ValueError("data.kind 'bioR' needs data.bior: the folder written by "
                             "`kcap data import-bior`")
        if not 0 <= self.qa_fraction <= MAX_QA_FRACTION:
            raise ValueError(f"data.qa_fraction must be in [0, {MAX_QA_FRACTION}] (the other half "
                             f"of the people is kept for the QA test), got {self.qa_fraction}")
        if self.qa_fraction and self.kind == "bioD":
            raise ValueError("data.qa_fraction: QA pairs are defined for bioS and bioR, not bioD")
        if self.kind != "bioS" and (self.junk_n or self.marker):
            which = "data.junk_n" if self.junk_n else "data.marker"
            raise ValueError(f"{which}: junk mixtures and the useful marker are defined for bioS, "
                             f"not {self.kind}")
        check_int("data.junk_ratio[0] (useful)", self.junk_ratio[0], 1)
        check_int("data.junk_ratio[1] (junk)", self.junk_ratio[1], 1)
        check_int("data.seed", self.seed, 0, MAX_SEED)


@dataclass
class TrainConfig:
    model: str = "gpt2-2-4"
    model_options: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    exposures: int = 100
    window: int = 512
    batch_size: int = 24        # windows per step, over all ranks
    steps: int | None = None    # None: derived from the exposures
    recipe: str | None = None   # "paper": lr, weight decay and batch from spec section 5
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: min(1000, steps // 10)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0      # 0: no clipping
    precision: str = "auto"     # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    eval_every: int = 0         # steps between capacity evaluations (0: only at the end)
    eval_sample: int | None = 2000  # people per evaluation (None: all)
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        check_fields(self)  # also builds (and so checks) data from a dict
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.recipe not in (None, "paper"):
            raise ValueError(f"recipe must be 'paper' or unset, got {self.recipe!r}")
        check_int("exposures", self.exposures, 1)
        check_int("window", self.window, 2)
        check_int("batch_size", self.batch_size, 1)
        for name in ("eval_every", "log_every", "checkpoint_every"):
            check_int(name, getattr(self, name), 0)
        check_int("keep_checkpoints", self.keep_checkpoints, 1)
        for name, low in (("steps", 1), ("warmup_steps", 0), ("eval_sample", 1)):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low)
        check_int("seed", self.seed, 0, MAX_SEED)
        self._check_optimizer()
        self._check_device()
        self._check_model()

    def _check_optimizer(self):
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must both be in [0, 1), got {list(self.betas)}")

    def _check_device(self):
        if self.device == "auto":
            return
        import torch

        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device must be 'auto' or a torch device such as 'cpu', 'cuda' or "
                             f"'cuda:1', got {self.device!r}") from None

    def _check_model(self):
        """The preset name and its overrides, checked by building their ModelConfig (cheap:
        no weights) at this window; the vocabulary is the data's, so any size stands in."""
        clash = {"context", "vocab_size"} & set(self.model_options)
        if clash:
            raise ValueError(f"model_options cannot set {sorted(clash)}: the context is the window "
                             "and the vocabulary is the data's")
        self.model_options = check_mapping(ModelConfig, self.model_options, "model_options")
        try:
            model_config(self.model, 1, context=self.window)
        except ValueError as err:
            raise ValueError(f"model: {err}") from None
        try:
            model_config(self.model, 1, context=self.window, **self.model_options)
        except ValueError as err:
            raise ValueError(f"model_options: {err}") from None


def _power_at_least(base: int, exponent: int, bound: int) -> bool:
    """Whether base ** exponent >= bound, without computing a huge power (base, exponent >= 1)."""
    if base == 1:
        return bound <= 1
    if exponent * math.log2(base) > bound.bit_length() + 1:
        return True
    return base ** exponent >= bound
