"""What a training run is: its configuration as dataclasses (TOML files map onto them, see
kcap.config_file). A run is a pure function of a TrainConfig (and the seeds it holds)."""
from __future__ import annotations

from dataclasses import dataclass, field

from kcap.data.arguments import check_int

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class DataConfig:
    kind: str = "bioS"          # bioS | bioD
    n: int = 1000
    variant: str = "online"     # bioS variants (see kcap.data.bios)
    k: int = 4                  # bioD parameters
    c: int = 2
    d: int = 100
    l: int = 2  # noqa: E741
    t: int = 50
    junk_n: int = 0             # > 0: mix in junk bioS(junk_n) windows
    junk_ratio: tuple = (1, 7)  # useful:junk tokens
    marker: bool = False        # prepend <|useful|> to useful biographies
    seed: int = 0


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
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
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
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        self.betas, self.data.junk_ratio = tuple(self.betas), tuple(self.data.junk_ratio)
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
        if self.steps is not None:
            check_int("steps", self.steps, 1)
        clash = {"context", "vocab_size"} & set(self.model_options)
        if clash:
            raise ValueError(f"model_options cannot set {sorted(clash)}: the context is the window "
                             "and the vocabulary is the data's")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.grad_clip >= 0):
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and grad_clip >= 0")
