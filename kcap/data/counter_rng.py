"""Counter-based random numbers: every draw is a pure function of (seed, stream, indices).

The data generators never carry RNG state. A template choice, a sentence order or a
person's birth city is ``hash(seed, stream tag, person, exposure, ...)``, so any biography of
any exposure can be rendered on its own, in any order, on any data-parallel rank, and a
stream resumes from a cursor without replaying what came before.

The hash is the splitmix64 finalizer chained over the keys; uniform integers are
``hash % n`` (bias below n / 2**64, i.e. nil for every cardinality used here).
``permute`` is a keyed pseudo-random permutation of [0, n) (a Feistel network on the next
even number of bits, with cycle walking back into range): it draws n-of-N0 names without
replacement and orders each epoch without materializing anything.
"""
from __future__ import annotations

import numpy as np

from kcap.data.arguments import check_int

MAX_SEED = (1 << 63) - 1  # seeds are non-negative int64: larger ones would wrap onto others
_MAX_KEY = (1 << 64) - 1
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FEISTEL_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def stream_key(seed: int, tag: str) -> int:
    """A 64-bit key for one named stream of one seed (tags keep streams independent).

    seed: int in [0, 2**63 - 1]; anything else is refused (masking it to 64 bits would
    silently turn 2**64 + 5 into seed 5).
    """
    seed = check_int("seed", seed, 0, MAX_SEED)
    if not isinstance(tag, str):
        raise TypeError(f"tag must be a str, got {type(tag).__name__}")
    h = np.array([seed], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for ch in tag.encode():
            h = _mix(h + np.uint64(ch) * _GOLDEN + np.uint64(1))
    return int(h[0])


def hash64(key: int, *indices) -> np.ndarray:
    """uint64 hash of ``key`` (an int in [0, 2**64)) and integer index arrays (broadcast
    together)."""
    key = check_int("key", key, 0, _MAX_KEY)
    arrays = [np.asarray(i).astype(np.uint64, copy=False) for i in indices]
    shape = np.broadcast_shapes(*(a.shape for a in arrays)) if arrays else ()
    h = np.full(shape, key, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(h)
        for a in arrays:
            h = _mix(h ^ (a * _GOLDEN + np.uint64(0x632BE59BD9B4E019)))
    return h


def uniform_int(key: int, n, *indices) -> np.ndarray:
    """Integers uniform in [0, n) (n scalar or broadcastable array), as int64."""
    return (hash64(key, *indices) % np.asarray(n, dtype=np.uint64)).astype(np.int64)


def permute(key: int, n: int, x, *subkeys) -> np.ndarray:
    """Image of ``x`` (ints in [0, n)) under a keyed pseudo-random permutation of [0, n).

    Distinct inputs give distinct outputs, so ``permute(k, N0, arange(N))`` is a draw of N
    items out of N0 without replacement. ``subkeys`` (index arrays broadcast with x) select
    one permutation per element: ``permute(k, N, i, epoch)`` orders every epoch afresh.
    """
    if n < 1:
        raise ValueError(f"permute: n must be >= 1, got {n}")
    x = np.asarray(x, dtype=np.int64)
    if n == 1:
        return np.zeros_like(x)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    round_keys = [hash64(key, *subkeys, r) for r in range(_FEISTEL_ROUNDS)]
    shift = np.uint64(half)

    shape = np.broadcast_shapes(x.shape, *(k.shape for k in round_keys))
    round_keys = [np.broadcast_to(k, shape).reshape(-1) for k in round_keys]

    def encrypt(v: np.ndarray, rows) -> np.ndarray:
        left, right = v >> shift, v & mask
        with np.errstate(over="ignore"):
            for rk in round_keys:
                left, right = right, left ^ (_mix(right ^ rk[rows]) & mask)
        return (left << shift) | right

    y = encrypt(np.broadcast_to(x, shape).reshape(-1).astype(np.uint64), slice(None))
    limit = np.uint64(n)
    out_of_range = np.flatnonzero(y >= limit)
    while out_of_range.size:  # cycle walking: at most ~4 rounds expected (domain < 4n)
        y[out_of_range] = encrypt(y[out_of_range], out_of_range)
        out_of_range = out_of_range[y[out_of_range] >= limit]
    return y.astype(np.int64).reshape(shape)


def random_order(key: int, *indices, width: int) -> np.ndarray:
    """Per-row random orders of ``width`` items: argsort of hashed keys.

    ``indices`` are arrays of shape (B,); the result has shape (B, width), each row a
    permutation of [0, width).
    """
    cols = np.arange(width, dtype=np.uint64)
    keys = hash64(key, *[np.asarray(i)[:, None] for i in indices], cols[None, :])
    return np.argsort(keys, axis=1, kind="stable")
