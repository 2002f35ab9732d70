"""Position-index samplers (docs/methods.md): which RoPE positions and which tokens fill a window.

Public API (pure `jax.numpy` / `jax.random`, static shapes, jit-able):

    sample(key, method, *, window, target, batch, **options) -> (position_ids, token_index)
        Both int32 [batch, window]. `position_ids` is what RoPE sees, `token_index`
        which tokens of each example's buffer fill the slots. `method`, `window` (N),
        `target` (L), `batch` and the options are static (validated in plain Python,
        ValueError on anything bad); only `key` (and `doc_lengths`) may be traced.
    fold_step(key, step) -> key
        `jax.random.fold_in(key, step)`: a fresh draw at every train step.

Methods and their options:

- "cream": CREAM (docs/methods.md). Needs an integer f = target // window >= 1.
    gaussian     "truncated" (default; truncated normal on [1, f], inverse CDF) or
                 "reference" (the reference code: r from the unnormalised normal CDF
                 on a 1000-point grid over [2, 2f], floored, alpha = r / 2; the mass
                 outside the range piles up on alpha = 1 and alpha = f).
    sigma        3.0. alpha has mean (1 + f) / 2 and standard deviation std_alpha:
    sigma_scale  "absolute" (default): std_alpha = sigma / 2 (in units of N, the paper).
                 "relative": std_alpha = (sigma / 2) * (f / 8), i.e. the paper's spread
                 at its own f = 8 (4K -> 32K), stretched in proportion to f.
                 Trade-off: with "absolute" at large f (say 64) alpha stays within a few
                 units of f / 2, so the middle almost always lands near L / 2 and the
                 positions between N and ~L / 3 or beyond ~2L / 3 are rarely trained;
                 "relative" keeps the shape of the distribution over [1, f] fixed and
                 covers the whole range, at the price of a less concentrated middle.
    p_continuity 0.5: probability (per example) of the continuity mode.
    k            None -> 4 * f: head/tail length in continuity mode (2k < window).
    content      "contiguous" (default; token_index = arange(window)) or "offsets"
                 (reference: head tokens [0, h), middle tokens = the middle positions
                 if P_e < n else [n - t - m, n - t), tail tokens [n - t, n)).
    doc_lengths  int [batch], "offsets" only: the true document length n of each
                 example, window <= n <= target (default target; traced values are
                 clipped into that range).
- "pose": PoSE, two chunks. chunk 1 positions [0, l1), l1 ~ U{1..(N + 1) // 2};
  chunk 2 positions [l1 + u, N + u), u ~ U{0..L - N}. Options `content` and
  `doc_lengths`. With "offsets", chunk-2 text is the random later span
  [l1 + v, N + v) of the document, v ~ U{0..n - N}: v = u whenever that fits the
  document (text at its true offsets) and a fresh uniform draw otherwise, which
  keeps v exactly uniform.
- "randpos": N distinct positions uniform over [0, L) without replacement, sorted.
- "plain": arange(N), no randomness.
- "full": arange(L); requires window == target.
For every method but CREAM/PoSE "offsets", token_index = arange(window).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

METHODS = ("cream", "pose", "randpos", "plain", "full")
GAUSSIANS = ("truncated", "reference")
SIGMA_SCALES = ("absolute", "relative")
CONTENTS = ("contiguous", "offsets")
REFERENCE_GRID = 1000  # grid points of the reference inverse-CDF table

_OPTIONS: dict[str, dict[str, Any]] = {
    "cream": dict(gaussian="truncated", sigma=3.0, sigma_scale="absolute", p_continuity=0.5, k=None,
                  content="contiguous", doc_lengths=None),
    "pose": dict(content="contiguous", doc_lengths=None),
    "randpos": {},
    "plain": {},
    "full": {},
}

i32, f32 = jnp.int32, jnp.float32


def fold_step(key: jax.Array, step: int | jax.Array) -> jax.Array:
    """The key for train step `step`: fresh positions every step, reproducible from (key, step)."""
    return jax.random.fold_in(key, step)


def sample(key: jax.Array, method: str, *, window: int, target: int, batch: int,
           **options: Any) -> tuple[jax.Array, jax.Array]:
    """(position_ids, token_index), both int32 [batch, window]; see the module docstring."""
    out = _draw(key, method, window=window, target=target, batch=batch, **options)
    return out["position_ids"], out["token_index"]


def validate(method: str, *, window: int, target: int, names: dict[str, str] | None = None, **options: Any) -> None:
    """Raise ValueError (naming the bad value) if `sample` would reject these arguments; draws nothing.
    `names` says what to call method, window and target in the message (a config: "train.window")."""
    _validate(method, window, target, 1, options, names or {})


# ----------------------------------------------------------------------------- validation

def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _validate(method: str, window: int, target: int, batch: int, options: dict[str, Any],
              names: dict[str, str] | None = None) -> dict[str, Any]:
    """Checks everything static and returns the options with defaults filled in."""
    name_of = {"method": "method", "window": "window", "target": "target", "batch": "batch", **(names or {})}
    M, W, T = name_of["method"], name_of["window"], name_of["target"]
    if method not in METHODS:
        raise ValueError(f"{M}={method!r} is not one of {METHODS}")
    for name, value in (("window", window), ("target", target), ("batch", batch)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name_of[name]} must be a positive int, got {value!r}")
    if target < window:
        raise ValueError(f"{T} ({target}) must be >= {W} ({window})")
    allowed = _OPTIONS[method]
    for name in options:
        if name not in allowed:
            raise ValueError(f"unknown option {name!r} for method {method!r}; "
                             f"allowed: {', '.join(allowed) or 'none'}")
    opts = {**allowed, **options}

    if method == "full" and window != target:
        raise ValueError(f"{M}='full' trains at the target length: it needs {W} == {T}, got {W}={window}, "
                         f"{T}={target}")
    if "content" in opts and opts["content"] not in CONTENTS:
        raise ValueError(f"unknown content {opts['content']!r}; allowed: {', '.join(CONTENTS)}")
    if method != "cream":
        _check_doc_lengths(opts, window, target, batch)
        return opts

    if target % window:
        lo, hi = target // window * window, -(-target // window) * window
        raise ValueError(f"{T}={target} is not a multiple of {W}={window}: CREAM needs an integer ratio "
                         f"f = {T} / {W} (here {target / window:g}); set {T} to a multiple of {W}, e.g. "
                         f"{T}={lo} or {T}={hi}")
    if window < 3:
        raise ValueError(f"CREAM needs {W} >= 3 (head, middle and tail), got {W}={window}")
    f = target // window
    if opts["gaussian"] not in GAUSSIANS:
        raise ValueError(f"unknown gaussian {opts['gaussian']!r}; allowed: {', '.join(GAUSSIANS)}")
    if opts["sigma_scale"] not in SIGMA_SCALES:
        raise ValueError(f"unknown sigma_scale {opts['sigma_scale']!r}; allowed: {', '.join(SIGMA_SCALES)}")
    sigma = opts["sigma"]
    if not isinstance(sigma, (int, float, np.number)) or isinstance(sigma, bool) or not sigma > 0:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    p = opts["p_continuity"]
    if not isinstance(p, (int, float, np.number)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p_continuity must be a number in [0, 1], got {p!r}")
    k = 4 * f if opts["k"] is None else opts["k"]
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be a positive int or None (= 4 * f), got {opts['k']!r}")
    if p > 0 and 2 * k >= window:
        raise ValueError(f"k={k} too large for {W}={window}: continuity mode needs 2 * k < {W} "
                         f"(allowed: 1 <= k <= {(window - 1) // 2}; default k = 4 * f = {4 * f})")
    opts["k"] = int(k)
    _check_doc_lengths(opts, window, target, batch)
    return opts


def _check_doc_lengths(opts: dict[str, Any], window: int, target: int, batch: int) -> None:
    n = opts.get("doc_lengths")
    if n is None:
        return
    if opts["content"] != "offsets":
        raise ValueError("doc_lengths is only used with content='offsets', "
                         f"got content={opts['content']!r}")
    if jnp.shape(n) != (batch,):
        raise ValueError(f"doc_lengths must have shape ({batch},), got {jnp.shape(n)}")
    if not isinstance(n, jax.core.Tracer):
        n = np.asarray(n)
        if not np.issubdtype(n.dtype, np.integer) or n.min() < window or n.max() > target:
            raise ValueError(f"doc_lengths must be ints in [window, target] = [{window}, {target}], "
                             f"got {n.dtype} values in [{n.min()}, {n.max()}]")


# ----------------------------------------------------------------------------- drawing

def _draw(key: jax.Array, method: str, *, window: int, target: int, batch: int,
          **options: Any) -> dict[str, jax.Array]:
    """Like `sample`, plus per-example diagnostics for tests: CREAM adds `continuity`, `alpha`,
    `h` (= t), `p_end`; PoSE adds `l1`, `u` (and `v` with offsets). All leading dim `batch`."""
    opts = _validate(method, window, target, batch, options)
    N, L = window, target
    arange_BxS = jnp.broadcast_to(jnp.arange(N, dtype=i32), (batch, N))
    if method in ("plain", "full"):
        return {"position_ids": arange_BxS, "token_index": arange_BxS}

    keys_B = jax.random.split(key, batch)
    if method == "randpos":
        pos_BxS = jax.vmap(lambda k: jnp.sort(jax.random.permutation(k, L)[:N]))(keys_B).astype(i32)
        return {"position_ids": pos_BxS, "token_index": arange_BxS}

    n = opts.pop("doc_lengths")
    n_B = jnp.full((batch,), L, i32) if n is None else jnp.clip(jnp.asarray(n, i32), N, L)
    one = _cream_one if method == "cream" else _pose_one
    return jax.vmap(functools.partial(one, N=N, L=L, **opts))(keys_B, n_B)


def _cream_one(key: jax.Array, n: jax.Array, *, N: int, L: int, gaussian: str, sigma: float,
               sigma_scale: str, p_continuity: float, k: int, content: str) -> dict[str, jax.Array]:
    f = L // N
    k_mode, k_alpha, k_end = jax.random.split(key, 3)
    continuity = jax.random.bernoulli(k_mode, p_continuity)
    h = jnp.where(continuity, k, N // 3).astype(i32)
    t, m = h, N - 2 * h

    std = sigma / 2 * (f / 8 if sigma_scale == "relative" else 1.0)
    if f == 1:
        alpha = jnp.ones((), f32)
    elif gaussian == "truncated":
        alpha = _truncated_alpha(k_alpha, f, std)
    else:
        alpha = _reference_alpha(k_alpha, f, 2 * std)
    p_end = _middle_end(k_end, alpha, h, m, t, N, L)

    i = jnp.arange(N, dtype=i32)
    is_head, is_tail = i < h, i >= N - t
    mid_pos = p_end - m + 1 + (i - h)
    pos = jnp.where(is_head, i, jnp.where(is_tail, L - N + i, mid_pos))
    if content == "contiguous":
        tok = i
    else:
        mid_tok = jnp.where(p_end < n, mid_pos, n - t - m + (i - h))
        tok = jnp.where(is_head, i, jnp.where(is_tail, n - N + i, mid_tok))
    return {"position_ids": pos, "token_index": tok.astype(i32), "continuity": continuity,
            "alpha": alpha, "h": h, "p_end": p_end}


def _truncated_alpha(key: jax.Array, f: int, std: float) -> jax.Array:
    """alpha ~ Normal((1 + f) / 2, std) truncated to [1, f], by inverse CDF in float32."""
    mu = (1 + f) / 2
    cdf_lo = ndtr(jnp.asarray((1 - mu) / std, f32))
    u = jax.random.uniform(key, (), f32)
    # [1, f] is symmetric about mu: invert the lower half and reflect, so ndtri only sees
    # p <= 0.5, where float32 keeps its relative precision (near p = 1 it would not).
    p = cdf_lo + jnp.minimum(u, 1 - u) * (1 - 2 * cdf_lo)
    z = ndtri(p)
    return jnp.clip(mu + std * jnp.where(u < 0.5, z, -z), 1.0, float(f))


def _reference_alpha(key: jax.Array, f: int, std_r: float) -> jax.Array:
    """The reference code's draw: r = floor(interp(u, Phi_grid, grid)) on [2, 2f], alpha = r / 2.

    The CDF table is not renormalised: u below Phi(2) or above Phi(2f) maps to the grid's
    ends (np.interp/jnp.interp clamp), so the outside mass piles up on r = 2 and r = 2f.
    """
    grid = jnp.linspace(2.0, 2.0 * f, REFERENCE_GRID, dtype=f32)
    cdf = ndtr((grid - (1 + f)) / std_r)
    u = jax.random.uniform(key, (), f32)
    r = jnp.clip(jnp.floor(jnp.interp(u, cdf, grid)), 2, 2 * f)
    return r / 2


def _middle_end(key: jax.Array, alpha: jax.Array, h: jax.Array, m: jax.Array, t: jax.Array,
                N: int, L: int) -> jax.Array:
    """P_e ~ UniformInt[floor(h + alpha (m - 1)), floor(alpha N) - t - 1], both ends inclusive."""
    lo = jnp.floor(h + alpha * (m - 1)).astype(i32)
    hi = jnp.floor(alpha * N).astype(i32) - t - 1
    # Exact arithmetic gives h + m - 1 <= lo <= hi <= L - t - 1 for alpha in [1, f]; the clips
    # only undo float32 rounding, keeping the middle clear of head and tail.
    hi = jnp.clip(hi, h + m - 1, L - t - 1)
    lo = jnp.clip(lo, h + m - 1, hi)
    return jax.random.randint(key, (), lo, hi + 1, dtype=i32)


def _pose_one(key: jax.Array, n: jax.Array, *, N: int, L: int, content: str) -> dict[str, jax.Array]:
    k_l1, k_u, k_v = jax.random.split(key, 3)
    l1 = jax.random.randint(k_l1, (), 1, (N + 1) // 2 + 1, dtype=i32)
    u = jax.random.randint(k_u, (), 0, L - N + 1, dtype=i32)
    i = jnp.arange(N, dtype=i32)
    pos = jnp.where(i < l1, i, i + u)
    out = {"position_ids": pos, "token_index": i, "l1": l1, "u": u}
    if content == "offsets":
        # u is uniform on [0, L - N]; keeping it when it fits and redrawing otherwise makes
        # v uniform on [0, n - N] while text sits at its true offsets whenever it can.
        v = jnp.where(u <= n - N, u, jax.random.randint(k_v, (), 0, n - N + 1, dtype=i32))
        out.update(token_index=jnp.where(i < l1, i, i + v), v=v)
    return out
