"""MoE routing: one function, a C++ fast path (csrc/) and a plain torch reference.

    route(logits, k, capacity_factor=2.0, block=64, impl="auto") -> Routing

logits: (T, E) float32/float16/bfloat16, contiguous, finite (NaN or inf is a ValueError),
E <= MAX_EXPERTS. Rules (both implementations, exactly):
- probabilities: softmax over all E experts in fp32; the top k by logit (the probabilities'
  order, free of their rounding), ties to the lower expert id;
- gates: the top-k probabilities renormalised to sum to 1 when k > 1; with k = 1 the raw
  probability (Switch Transformer: a renormalised single gate would always be 1);
- capacity = ceil(capacity_factor * T * k / E) slots per expert (capacity_factor None:
  dropless); slots are filled in (choice rank, token) order, so every first choice is
  served before any second choice; assignments past capacity are marked ``dropped``;
- slot s = t * k + j is token t's j-th choice; ``perm`` lists the kept slots sorted stably by
  expert (token order within an expert), ``inverse[s]`` is s's position in perm (-1 if
  dropped), ``offsets`` the exclusive prefix sums of the kept ``counts``;
  ``padded_perm`` rounds each expert's run up to whole ``block``s (-1 marks padding) and
  ``block_expert`` names each block's expert, for the grouped GEMM;
- statistics: ``frac`` (fraction of all T*k assignments per expert, before drops),
  ``mean_prob`` (mean router probability per expert), ``z_loss`` = mean(logsumexp^2), a 0-d
  tensor.
The router is not differentiated: the MoE recomputes differentiable gates and losses from
the logits with torch ops on these indices.

Implementations: "cpp" runs csrc/router_cpu.cpp on CPU tensors and csrc/router_cuda.cu on
CUDA tensors (when built); "torch" is ``route_reference``; "auto" takes the C++ one when it
is built for the tensor's device. **The CUDA router never synchronises with the host**, so
its variable-length outputs keep their maximum size: ``perm`` has T*k entries and
``padded_perm`` / ``block_expert`` (ceil(T*k/block) + E) blocks, with -1 past their true
end, and ``sizes`` holds (n_kept, n_padded, n_blocks) on the device. For the same reason it
does not raise on non-finite logits: it drops every assignment of such tokens and counts
them in ``non_finite`` (on the CPU, and in the reference, they are a ValueError).

Processes: the C++ extensions check every argument themselves (csrc/README.md). The CPU
router runs on an OpenMP thread pool, which does not survive ``fork()``: in a forked child it
routes serially instead of hanging, but torch's own parallel CPU ops do hang there. So
multi-process runners (sweeps, workers) must start their workers with the 'spawn' method,
``multiprocessing.get_context("spawn")``, never 'fork'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_EXPERTS = 1024
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass
class Routing:
    expert: torch.Tensor        # (T, k) int64
    gate: torch.Tensor          # (T, k) float32
    dropped: torch.Tensor       # (T, k) bool
    counts: torch.Tensor        # (E,) int64 kept assignments per expert
    offsets: torch.Tensor       # (E + 1,) int64
    perm: torch.Tensor          # (n_kept,) int64 slot ids sorted by expert
    inverse: torch.Tensor       # (T * k,) int64
    padded_perm: torch.Tensor   # (n_padded,) int64, -1 = padding
    block_expert: torch.Tensor  # (n_padded // block,) int64
    capacity: int
    frac: torch.Tensor          # (E,) float32
    mean_prob: torch.Tensor     # (E,) float32
    z_loss: torch.Tensor        # () float32
    sizes: torch.Tensor | None = None       # (3,) int64 n_kept, n_padded, n_blocks (CUDA)
    non_finite: torch.Tensor | None = None  # () int64 tokens with NaN/inf logits (CUDA)

    @property
    def keep(self) -> torch.Tensor:
        return ~self.dropped


def _capacity(T: int, k: int, E: int, capacity_factor) -> int:
    return T * k if capacity_factor is None else math.ceil(capacity_factor * T * k / E)


def _check(logits, k, capacity_factor, block):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"router logits must be (T, E), got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if not logits.is_contiguous():
        raise ValueError("logits must be contiguous (call .contiguous())")
    E = logits.shape[1]
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"the number of experts must be in [1, {MAX_EXPERTS}], got {E}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k!r}")
    if capacity_factor is not None and not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor must be > 0 (or None: dropless), got {capacity_factor}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")


def route(logits: torch.Tensor, k: int, capacity_factor: float | None = 2.0, block: int = 64,
          impl: str = "auto") -> Routing:
    """Route T tokens over E experts; see the module docstring. impl: auto | cpp | torch."""
    _check(logits, k, capacity_factor, block)
    if impl not in ("auto", "cpp", "torch"):
        raise ValueError(f"impl must be auto, cpp or torch, got {impl!r}")
    if impl == "torch" or (impl == "auto" and not cpp_available(logits.device)):
        return route_reference(logits, k, capacity_factor, block)
    device = logits.device.type
    if device not in ("cpu", "cuda"):
        raise RuntimeError(f"no C++ router for {device} tensors; use impl='torch' or 'auto'")
    if not cpp_available(logits.device):
        what = ("kcap._router_cpu: reinstall with `pip install -e .` (needs a C++ compiler)"
                if device == "cpu" else "kcap._router_cuda: it is built by `pip install -e .` "
                "only where nvcc is found (see setup.py)")
        raise RuntimeError(f"the C++ router for {device} is not built ({what}); or use impl='torch'")
    if device == "cuda":
        return _route_cuda(logits, k, capacity_factor, block)
    return _route_cpu(logits, k, capacity_factor, block)


def cpp_available(device) -> bool:
    """Whether the C++ router for this device was built into this install."""
    import importlib

    name = {"cpu": "kcap._router_cpu", "cuda": "kcap._router_cuda"}.get(torch.device(device).type)
    if name is None:
        return False
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _bf16_bits(logits: torch.Tensor) -> torch.Tensor:
    """logits detached, bfloat16 reinterpreted as int16 bits (numpy and the CUDA array
    interface have no bfloat16; the extensions read the bits back as bfloat16)."""
    logits = logits.detach()
    return logits.view(torch.int16) if logits.dtype == torch.bfloat16 else logits


def _route_cpu(logits, k, capacity_factor, block) -> Routing:
    from kcap import _router_cpu as ext

    T, E = logits.shape
    n = T * k
    i64 = dict(dtype=torch.int64)
    expert, inverse, perm = torch.empty(n, **i64), torch.empty(n, **i64), torch.empty(n, **i64)
    gate = torch.empty(n, dtype=torch.float32)
    dropped = torch.empty(n, dtype=torch.uint8)
    prob_sum = torch.empty(E, dtype=torch.float64)
    counts, offsets = torch.empty(E, **i64), torch.empty(E + 1, **i64)
    max_padded = n + E * (block - 1)
    padded, block_expert = torch.empty(max_padded, **i64), torch.empty(max_padded // block + E, **i64)
    scalars = torch.zeros(4, dtype=torch.float64)
    capacity = _capacity(T, k, E, capacity_factor)
    # Zero-copy numpy views: the extension checks each one's item type and size itself.
    status = ext.route(_bf16_bits(logits).numpy(), _DTYPES[logits.dtype], T, E, k,
                       -1 if capacity_factor is None else capacity, block, expert.numpy(),
                       gate.numpy(), dropped.numpy(), prob_sum.numpy(), counts.numpy(),
                       offsets.numpy(), perm.numpy(), inverse.numpy(), padded.numpy(),
                       block_expert.numpy(), scalars.numpy(), torch.get_num_threads())
    if status == ext.NON_FINITE:
        raise ValueError("router logits contain NaN or inf")
    z_sum, n_kept, n_padded, n_blocks = (int(v) if i else v for i, v in enumerate(scalars.tolist()))
    frac = torch.bincount(expert, minlength=E).float() / max(n, 1)
    return Routing(expert.view(T, k), gate.view(T, k), dropped.view(T, k).bool(), counts, offsets,
                   perm[:n_kept], inverse, padded[:n_padded], block_expert[:n_blocks], capacity,
                   frac, (prob_sum / max(T, 1)).float(), torch.tensor(z_sum / max(T, 1)))


def _route_cuda(logits, k, capacity_factor, block) -> Routing:
    from kcap import _router_cuda as ext

    T, E = logits.shape
    n, dev = T * k, logits.device
    max_blocks = -(-n // block) + E
    chunks = -(-n // 256)

    def new(size, dtype=torch.int64):
        return torch.empty(size, dtype=dtype, device=dev)

    expert, gate, zterm = new(n), new(n, torch.float32), new(T, torch.float32)
    bad, dropped = new(T, torch.uint8), new(n, torch.uint8)
    hist, base = new(max(chunks, 1) * E), new(max(chunks, 1) * E)
    total, counts, offsets, pad_offsets = new(E), new(E), new(E + 1), new(E + 1)
    perm, inverse = new(n), new(n)
    padded, block_expert = new(max_blocks * block), new(max_blocks)
    sizes, status = new(3), new(1)
    capacity = _capacity(T, k, E, capacity_factor)
    # The tensors go as they are (their __cuda_array_interface__ is checked in C++); the
    # kernels run on the current device, so make it the logits' device.
    with torch.cuda.device(dev):
        code = ext.route_cuda(_DTYPES[logits.dtype], T, E, k,
                              -1 if capacity_factor is None else capacity, block, max_blocks,
                              torch.cuda.current_stream(dev).cuda_stream, _bf16_bits(logits),
                              expert, gate, zterm, bad, dropped, hist, base, total, counts, offsets,
                              pad_offsets, perm, inverse, padded, block_expert, sizes, status)
    if code != 0:
        raise RuntimeError(f"the CUDA router failed to launch (code {code})")
    frac = total.float() / max(n, 1)
    mean_prob = torch.softmax(logits.float(), dim=-1).mean(0) if T else torch.zeros(E, device=dev)
    z = zterm.mean() if T else torch.zeros((), device=dev)
    return Routing(expert.view(T, k), gate.view(T, k), dropped.view(T, k).bool(), counts, offsets,
                   perm, inverse, padded, block_expert, capacity, frac, mean_prob, z, sizes,
                   status[0])


def route_reference(logits: torch.Tensor, k: int, capacity_factor: float | None = 2.0,
                    block: int = 64) -> Routing:
    """The routing rules in plain torch ops (softmax, stable sort, one-hot cumsum, bincount)."""
    _check(logits, k, capacity_factor, block)
    T, E = logits.shape
    dev = logits.device
    probs = torch.softmax(logits.float(), dim=-1)
    if T and not torch.isfinite(logits).all():
        raise ValueError("router logits contain NaN or inf")
    expert = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    top = probs.gather(-1, expert)
    gate = top / top.sum(-1, keepdim=True) if k > 1 else top
    capacity = _capacity(T, k, E, capacity_factor)
    rank_major = torch.nn.functional.one_hot(expert.t().reshape(-1), E)  # (k*T, E), (j, t) order
    position = ((rank_major.cumsum(0) - 1) * rank_major).sum(-1).view(k, T).t()
    dropped = position >= capacity
    flat_expert, kept = expert.reshape(-1), ~dropped.reshape(-1)
    counts = torch.bincount(flat_expert[kept], minlength=E)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), counts.cumsum(0)])
    slots = torch.arange(T * k, device=dev)[kept]
    perm = slots[torch.sort(flat_expert[kept], stable=True).indices]
    inverse = torch.full((T * k,), -1, dtype=torch.int64, device=dev)
    inverse[perm] = torch.arange(len(perm), device=dev)
    blocks = (counts + block - 1) // block
    padded_offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), (blocks * block).cumsum(0)])
    padded = torch.full((int(padded_offsets[-1]),), -1, dtype=torch.int64, device=dev)
    owner = flat_expert[perm]
    padded[padded_offsets[owner] + torch.arange(len(perm), device=dev) - offsets[owner]] = perm
    block_expert = torch.repeat_interleave(torch.arange(E, device=dev), blocks)
    frac = torch.bincount(flat_expert, minlength=E).float() / max(T * k, 1)
    z = (torch.logsumexp(logits.float(), -1) ** 2).mean() if T else torch.zeros((), device=dev)
    mean_prob = probs.mean(0) if T else torch.zeros(E, device=dev)
    return Routing(expert, gate, dropped, counts, offsets, perm, inverse, padded, block_expert,
                   capacity, frac, mean_prob, z)
