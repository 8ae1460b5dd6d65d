"""Correctness of every autotuning candidate of the attention kernels, one config at a time.

The GPU tests pin each kernel to its first config (KCAP_AUTOTUNE=0), and autotuning picks
whichever candidate is fastest for a shape, so a candidate that computes a wrong answer
would go unseen. This forces each candidate in turn and applies the tests' rule (kernel
error <= 2 x torch's own error at the same precision + one ulp). GPU only:
    KCAP_AUTOTUNE=1 python -m bench.config_check [attention | fp32]
"""
from __future__ import annotations

import sys
import time

import torch

CASES = [(2, 8, 2, 17, 90, 128, False), (1, 2, 2, 70, 70, 128, True), (2, 8, 2, 17, 90, 64, False),
         (1, 4, 1, 130, 130, 64, True)]


def _grads(fn, q, k, v, do, causal):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, causal=causal)
    o.backward(do.to(o.dtype))
    return [o.detach(), q.grad, k.grad, v.grad]


def _sdpa(q, k, v, causal):
    rep = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal)


def _errors(case, dtype, seed=0):
    """(name, kernel error, torch error, ok) for out, dq, dk, dv on fresh random inputs."""
    from kcap.kernels import attention_reference, flash_attention

    B, H, KV, T, S, D, causal = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g).cuda().to(dtype) for s in ((B, H, T, D), (B, KV, S, D), (B, KV, S, D)))
    do = torch.randn(q.shape, generator=g).cuda()
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    ref = _grads(attention_reference, *(x.to(ref_dtype) for x in (q, k, v)), do.to(ref_dtype), causal)
    low = _grads(_sdpa, q, k, v, do, causal)
    kern = _grads(flash_attention, q, k, v, do, causal)
    ulp = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -23}[dtype]
    out = []
    for name, r, t, x in zip(("out", "dq", "dk", "dv"), ref, low, kern):
        te = (t.to(ref_dtype) - r).abs().max().item()
        ke = (x.to(ref_dtype) - r).abs().max().item()
        out.append((name, ke, te, ke <= 2 * te + ulp * max(1.0, r.abs().max().item())))
    return out


def _force(kernel, cfg):
    kernel.configs, kernel.cache = [cfg], {}


def check_attention() -> int:
    from kcap.kernels import attention as A

    kernels = {"bwd": [A._bwd_dkdv_kernel, A._bwd_dq_kernel], "fwd": [A._fwd_kernel]}
    every = {name: list(ks[0].configs) for name, ks in kernels.items()}
    bad = 0
    for name, candidates in every.items():
        for i, cfg in enumerate(candidates):
            for other, ks in kernels.items():  # the other kernels stay on their first config
                for kern in ks:
                    _force(kern, cfg if other == name else every[other][0])
            for case in CASES:
                for dtype in (torch.float16, torch.bfloat16):
                    errs = _errors(case, dtype)
                    wrong = [f"{n} {ke:.2e} (torch {te:.2e})" for n, ke, te, ok in errs if not ok]
                    bad += bool(wrong)
                    print(f"{name} config {i} [{cfg}] case {case} {str(dtype)[6:]}: "
                          f"{'WRONG ' + '; '.join(wrong) if wrong else 'ok'}", flush=True)
    return bad


def check_fp32() -> int:
    """fp32 through each tl.dot precision: compile+run seconds and the test rule."""
    from kcap.kernels import attention as A

    bad = 0
    for precision in ("tf32x3", "ieee"):
        A.dot_precision = lambda dtype, p=precision: p
        for case in ((1, 2, 2, 33, 50, 64, False), (1, 4, 4, 50, 33, 32, False)):
            start = time.perf_counter()
            errs = _errors(case, torch.float32)
            seconds = time.perf_counter() - start
            bad += not all(ok for *_, ok in errs)
            print(f"fp32 {precision} case {case}: {seconds:.1f} s, "
                  + ", ".join(f"{n} {ke:.1e}/{te:.1e}{'' if ok else ' WRONG'}" for n, ke, te, ok in errs),
                  flush=True)
    return bad


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench.config_check needs a GPU")
    what = sys.argv[1] if len(sys.argv) > 1 else "attention"
    sys.exit(1 if {"attention": check_attention, "fp32": check_fp32}[what]() else 0)
