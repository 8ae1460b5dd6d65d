"""AdamW over a pack's stacked parameters: every model stepped as the solo trainer steps it.

The solo trainer (kcap.train) clips each model's gradients by its global norm
(torch.nn.utils.clip_grad_norm_) and steps torch.optim.AdamW with two param groups: weight
decay on tensors with ndim >= 2 (matrices, embeddings), none on biases and norm gains
(kcap.train._optimizer). StackedAdamW does the same per model, with per-model lr, weight
decay, betas, eps and max grad norm, per-model step counts and an ``active`` mask: a
finished model's weights, moments and step stay as they are.

It works on the pack's one (M, P) parameter (StackedModels.flat) and (M, P) moments, so a
step is about a dozen elementwise ops over the whole pack plus one foreach norm, whatever
the number of tensors (it was ~10 ops per tensor: ~1,300 kernel launches per step for a
4-layer model, which is what a tiny model's step pays for on a GPU).

The math is torch.optim.AdamW's single-tensor path op for op: the per-model scalars (bias
corrections, step size, decay factor) are computed in Python floats as torch computes
them, then applied as float32 (M, 1) columns, and fused ops keep their operand order
(``addcdiv(exp_avg * -step_size, denom)`` is ``addcdiv(exp_avg, denom, value=-step_size)``).
The clipping norm is clip_grad_norm_'s (per-tensor norms, then their norm). So on CPU a
step with equal gradients gives equal bits (tested). Hyperparameters and the schedule live
on the host, so a step never waits for the GPU: one small pinned upload.
"""
from __future__ import annotations

import math

import torch

from kcap.pack.stacked import StackedModels, decayed
from kcap.prefetch import upload

# columns of the per-step coefficient table (M, len(_COLUMNS))
_COLUMNS = ("decay", "one_minus_beta1", "beta2", "one_minus_beta2", "neg_step_size",
            "bias_correction2_sqrt", "eps", "max_norm")


class StackedAdamW:
    """AdamW for a StackedModels, one set of hyperparameters per model.

    lr, weight_decay, eps, max_grad_norm: a float (all models) or M floats; betas: a pair
    whose entries are each a float or M floats. max_grad_norm 0 turns clipping off for that
    model. ``lr`` is only the value recorded in state_for_model until the first step (as the
    solo optimizer is built with the peak lr); step() takes each step's lrs.
    """

    def __init__(self, pack: StackedModels, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98),
                 eps=1e-6, max_grad_norm=1.0):
        if not isinstance(pack, StackedModels):
            raise TypeError(f"StackedAdamW needs a StackedModels, got {type(pack).__name__}")
        self.pack, self.m = pack, pack.m
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        self.lr = self._per_model(lr, "lr", low=0.0)
        self.weight_decay = self._per_model(weight_decay, "weight_decay", low=0.0)
        self.beta1 = self._per_model(betas[0], "betas[0]", low=0.0, below=1.0)
        self.beta2 = self._per_model(betas[1], "betas[1]", low=0.0, below=1.0)
        self.eps = self._per_model(eps, "eps", low=0.0, positive=True)
        self.max_grad_norm = self._per_model(max_grad_norm, "max_grad_norm", low=0.0)
        self.steps = [0] * self.m
        named = pack.named_stacked()
        # the solo optimizer's order: decayed tensors (group 0), then the others (group 1)
        self.groups = ([n for n, p in named if decayed(p.ndim - 1)],
                       [n for n, p in named if not decayed(p.ndim - 1)])
        # pack.flat lays the decayed blocks out first: they are its first _decay_cols columns
        self._decay_cols = sum(size for n, size in zip(pack.layout, pack.sizes)
                               if decayed(len(pack.shapes[n])))
        flat = pack.flat
        self._exp_avg_flat = torch.zeros_like(flat, memory_format=torch.contiguous_format)
        self._exp_avg_sq_flat = torch.zeros_like(flat, memory_format=torch.contiguous_format)
        self.exp_avg = pack._blocks(self._exp_avg_flat)
        self.exp_avg_sq = pack._blocks(self._exp_avg_sq_flat)
        self._work = None  # _scratch()

    def _per_model(self, value, name: str, low: float, below: float | None = None,
                   positive: bool = False) -> list[float]:
        """M Python floats from a float, a sequence or a 1-D tensor (validated)."""
        if torch.is_tensor(value):
            value = value.tolist()
        values = list(value) if isinstance(value, (list, tuple)) else [value] * self.m
        if len(values) != self.m:
            raise ValueError(f"{name} needs a float or {self.m} values, got {len(values)}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{name} values must be finite numbers, got {v!r}")
            if v < low or (below is not None and v >= below) or (positive and v <= 0):
                raise ValueError(f"{name} values must be {'> ' if positive else '>= '}{low}"
                                 f"{f' and < {below}' if below is not None else ''}, got {v}")
        return [float(v) for v in values]

    def zero_grad(self, set_to_none: bool = True) -> None:
        flat = self.pack.flat
        if set_to_none:
            flat.grad = None
        elif flat.grad is not None:
            flat.grad.zero_()

    def _table(self, lrs: list[float], active: list[bool]) -> torch.Tensor:
        """The per-model coefficients of this step, (M, len(_COLUMNS)) float32 on the
        params' device, computed exactly as torch's _single_tensor_adam computes its scalars."""
        rows = []
        for i in range(self.m):
            lr, b1, b2 = lrs[i], self.beta1[i], self.beta2[i]
            step = float(self.steps[i] + 1)  # the step this update would be (unused if inactive)
            bias_correction1 = 1 - b1 ** step
            bias_correction2 = 1 - b2 ** step
            rows.append([1 - lr * self.weight_decay[i], 1 - b1, b2, 1 - b2, -(lr / bias_correction1),
                         bias_correction2 ** 0.5, self.eps[i], self.max_grad_norm[i]])
        # float64 -> float32 rounds each value as torch's kernels round a Python scalar
        table = torch.tensor(rows, dtype=torch.float64).to(torch.float32)
        return upload(table, self.pack.flat.device)

    @torch.no_grad()
    def step(self, lrs, active=None) -> torch.Tensor:
        """One AdamW step of every active model; returns each model's gradient norm before
        clipping, (M,) float32 (as clip_grad_norm_ returns it).

        lrs: (M,) this step's learning rates (a float64 CPU tensor or a list of floats keeps
        the schedule's exact values; a device tensor costs a synchronisation). active: (M,)
        bool (default all): an inactive model is left exactly as it is, whatever its grads.
        """
        lrs = self._per_model(lrs, "lrs", low=0.0)
        if active is None:
            active = [True] * self.m
        elif torch.is_tensor(active):
            if active.dtype != torch.bool or active.shape != (self.m,):
                raise ValueError(f"active must be a bool tensor of shape ({self.m},), got "
                                 f"{active.dtype} {tuple(active.shape)}")
            active = active.tolist()
        elif len(active) != self.m or not all(isinstance(a, bool) for a in active):
            raise ValueError(f"active must be {self.m} bools, got {active!r}")
        table = self._table(lrs, active)
        col = {name: table[:, j:j + 1] for j, name in enumerate(_COLUMNS)}  # (M, 1) each
        # one gradient for the whole pack: a block the forward did not use would get zeros
        # (and decay) where the solo optimizer skips a gradient-less tensor; every tensor of
        # a kcap Transformer takes part in its forward, so this never arises
        grad = self.pack.flat.grad
        if grad is None:
            norms = torch.zeros(self.m, device=table.device)
        else:
            norms = self._clip(grad, col["max_norm"])
            self._update(grad, col, active)
        for i in range(self.m):
            if active[i]:
                self.steps[i] += 1
                self.lr[i] = lrs[i]
        return norms

    def _clip(self, grad: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
        """Scale each model's gradients (row of the (M, P) ``grad``) as clip_grad_norm_ would
        for that model alone: g *= min(max_norm / (norm + 1e-6), 1), the norm over its own
        tensors only, computed as clip_grad_norm_ computes it (each tensor's norm, in the
        solo parameter order, then the norm of those): one foreach call over the M x T
        blocks (contiguous 1-D rows), the same bits as the solo norms on the CPU."""
        blocks = self.pack._blocks(grad)
        rows = [blocks[n][i].reshape(-1) for i in range(self.m) for n in self.pack.names]
        per_tensor = torch.stack(torch._foreach_norm(rows)).view(self.m, len(self.pack.names))
        total = torch.linalg.vector_norm(per_tensor, dim=1)
        # (total + 1e-6).reciprocal() * max_norm: how torch evaluates max_norm / tensor
        coef = ((total + 1e-6).reciprocal() * max_norm[:, 0]).clamp(max=1.0)
        coef = torch.where(max_norm[:, 0] > 0, coef, torch.ones_like(coef))
        grad.mul_(coef.view(self.m, 1).to(grad.dtype))
        return total

    def _update(self, g: torch.Tensor, c: dict, active: list[bool]) -> None:
        """torch.optim.AdamW's single-tensor update, op for op, on the whole pack at once:
        ``g`` the (M, P) gradient of pack.flat, ``c`` the per-model (M, 1) columns. With
        every model active it runs in place; otherwise on the active rows only, gathered
        and scattered back, so an inactive model is not touched."""
        p, m, v = self.pack.flat, self._exp_avg_flat, self._exp_avg_sq_flat
        rows = None
        if not all(active):
            rows = upload(torch.tensor([i for i, a in enumerate(active) if a]), p.device)
            p, m, v, g = (t.index_select(0, rows) for t in (p, m, v, g))
            c = {k: col.index_select(0, rows) for k, col in c.items()}
        p[:, :self._decay_cols].mul_(c["decay"])  # group 1 has weight_decay 0: no multiply
        m.lerp_(g, c["one_minus_beta1"])
        # the temporaries go to two persistent (M, P) buffers: fresh ones of the pack's size
        # cost a page-faulting allocation per op on the CPU (on CUDA, an allocator call)
        gs, denom = (w[:p.shape[0]] for w in self._scratch())  # active rows only
        # addcmul(g, g, value=s) computes s * g * g: (g * s) * g is the same product
        v.mul_(c["beta2"]).addcmul_(torch.mul(g, c["one_minus_beta2"], out=gs), g)
        torch.sqrt(v, out=denom).div_(c["bias_correction2_sqrt"]).add_(c["eps"])
        # = addcdiv(m, denom, value=-step)
        p.addcdiv_(torch.mul(m, c["neg_step_size"], out=gs), denom)
        if rows is not None:
            self.pack.flat.index_copy_(0, rows, p)
            self._exp_avg_flat.index_copy_(0, rows, m)
            self._exp_avg_sq_flat.index_copy_(0, rows, v)

    def _scratch(self) -> list[torch.Tensor]:
        """Two (M, P) work buffers like pack.flat, made on first use."""
        if self._work is None:
            self._work = [torch.empty_like(self.pack.flat, memory_format=torch.contiguous_format)
                          for _ in range(2)]
        return self._work

    # --- per-model checkpoints in the solo optimizer's format -------------------------------

    def _group_template(self) -> dict:
        """A param group of this torch version's AdamW.state_dict() (its keys and defaults)."""
        return torch.optim.AdamW([torch.zeros(1)], fused=False).state_dict()["param_groups"][0]

    def state_for_model(self, i: int) -> dict:
        """Model i's optimizer state as torch.optim.AdamW.state_dict() of the solo trainer
        (kcap.train._optimizer's two groups) would give it: copies, moments on the params'
        device, ``step`` a float32 scalar tensor (on the device when fused, as on CUDA)."""
        i = self._index(i)
        device = self.pack.flat.device
        fused = device.type == "cuda"  # as kcap.train._optimizer builds it
        order = self.groups[0] + self.groups[1]
        groups = []
        for g, names in enumerate(self.groups):
            group = self._group_template()
            first = sum(len(x) for x in self.groups[:g])
            group.update(lr=self.lr[i], betas=(self.beta1[i], self.beta2[i]), eps=self.eps[i],
                         weight_decay=self.weight_decay[i] if g == 0 else 0.0, fused=fused,
                         params=list(range(first, first + len(names))))
            groups.append(group)
        state = {}
        if self.steps[i]:  # the solo optimizer has no state before its first step
            step_device = device if fused else torch.device("cpu")
            for j, n in enumerate(order):
                step = torch.tensor(float(self.steps[i]), dtype=torch.float32, device=step_device)
                state[j] = {"step": step,
                            "exp_avg": self.exp_avg[n][i].clone(),
                            "exp_avg_sq": self.exp_avg_sq[n][i].clone()}
        return {"state": state, "param_groups": groups}

    def load_model_state(self, i: int, state_dict: dict) -> None:
        """Load a solo AdamW state_dict (as state_for_model or the solo trainer gives it)
        into model i: its moments, step and hyperparameters (lr, weight decay, betas, eps)."""
        i = self._index(i)
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            raise ValueError("an optimizer state_dict has exactly the keys 'state' and 'param_groups'")
        groups, state = state_dict["param_groups"], state_dict["state"]
        order = self.groups[0] + self.groups[1]
        expect = [list(range(len(self.groups[0]))), list(range(len(self.groups[0]), len(order)))]
        if len(groups) != 2 or [list(g.get("params", ())) for g in groups] != expect:
            raise ValueError("param_groups must be the solo trainer's two groups (decayed tensors "
                             f"{expect[0]}, then the others {expect[1]})")
        g0, g1 = groups
        for key in ("lr", "betas", "eps"):
            if list(map(float, g0[key] if key == "betas" else [g0[key]])) != \
                    list(map(float, g1[key] if key == "betas" else [g1[key]])):
                raise ValueError(f"the two param groups differ in {key}; a pack holds one per model")
        if g1["weight_decay"] != 0 or g0.get("amsgrad") or g0.get("maximize"):
            raise ValueError("the pack's AdamW needs weight_decay 0 on group 1, amsgrad and maximize off")
        if state and set(state) != set(range(len(order))):
            raise ValueError(f"state must hold all {len(order)} parameters or none")
        steps = {float(s["step"]) for s in state.values()}
        if len(steps) > 1:
            raise ValueError(f"all parameters must be at one step, got {sorted(steps)}")
        for j, n in enumerate(order if state else ()):
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(state[j][key].shape) != self.pack.shapes[n]:
                    raise ValueError(f"state {j} ({n}) {key} has shape {tuple(state[j][key].shape)}, "
                                     f"expected {self.pack.shapes[n]}")
        lr, wd = float(g0["lr"]), float(g0["weight_decay"])
        b1, b2 = map(float, g0["betas"])
        eps = float(g0["eps"])
        if not (lr >= 0 and wd >= 0 and 0 <= b1 < 1 and 0 <= b2 < 1 and eps > 0):
            raise ValueError(f"bad hyperparameters: lr {lr}, weight_decay {wd}, betas {(b1, b2)}, eps {eps}")
        with torch.no_grad():
            for j, n in enumerate(order):
                self.exp_avg[n][i].copy_(state[j]["exp_avg"] if state else 0)
                self.exp_avg_sq[n][i].copy_(state[j]["exp_avg_sq"] if state else 0)
        self.steps[i] = int(steps.pop()) if state else 0
        self.lr[i], self.weight_decay[i], self.beta1[i], self.beta2[i], self.eps[i] = lr, wd, b1, b2, eps

    def _index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.m:
            raise ValueError(f"model index must be an int in [0, {self.m}), got {i!r}")
        return i
