"""Position-index samplers (docs/methods.md): invariants, distributions (scipy.stats) and validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cream_jax.positions import _draw, _middle_end, fold_step, sample

P_MIN = 1e-3  # accept a goodness-of-fit test above this
P_POWER = 1e-8  # a wrong distribution must be rejected below this
N, L, F = 64, 256, 4  # N // 3 = 21 differs from the default k = 4 * F = 16, so the modes are told apart


def draw(method, seed=0, **kw):
    """_draw under jit (static arguments bound), as numpy."""
    fn = jax.jit(functools.partial(_draw, method=method, **kw))
    return jax.tree.map(np.asarray, fn(jax.random.key(seed)))


def assert_rising_in_range(pos, target):
    assert pos.dtype == np.int32
    assert (np.diff(pos, axis=1) > 0).all()
    assert pos.min() >= 0 and pos.max() < target


# ----------------------------------------------------------------------------- 1. shapes, invariants, jit

@pytest.mark.parametrize("method, window, target, options", [
    ("cream", N, L, {}),
    ("cream", N, L, {"gaussian": "reference"}),
    ("cream", N, L, {"gaussian": "reference", "sigma": 50.0}),  # piles on alpha = 1 and alpha = f
    ("cream", N, L, {"sigma_scale": "relative", "content": "offsets"}),
    ("cream", 4096, 64 * 4096, {"sigma_scale": "relative"}),  # f = 64 at full scale: float32 bounds
    ("pose", N, L, {}),
    ("pose", N, L, {"content": "offsets"}),
    ("randpos", N, L, {}),
    ("plain", N, L, {}),
    ("full", L, L, {}),
])
def test_every_method_under_jit_gives_rising_ids_in_range(method, window, target, options):
    batch = 16
    fn = jax.jit(functools.partial(sample, method=method, window=window, target=target, batch=batch, **options))
    pos, tok = map(np.asarray, fn(jax.random.key(3)))
    assert pos.shape == tok.shape == (batch, window) and tok.dtype == np.int32
    assert_rising_in_range(pos, target)
    assert tok.min() >= 0 and tok.max() < target
    if method == "cream":
        assert (pos[:, -1] == target - 1).all()
    if method in ("plain", "full"):
        np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(window), (batch, window)))
    if method in ("cream", "pose", "randpos"):
        assert len({tuple(row) for row in pos}) > 1  # examples differ


@pytest.mark.parametrize("k", [None, 5])
def test_cream_segment_lengths_per_mode(k):
    d = draw("cream", window=N, target=L, batch=512, k=k)
    pos, cont = d["position_ids"], d["continuity"]
    assert 0 < cont.sum() < len(cont)
    h_B = np.where(cont, 4 * F if k is None else k, N // 3)
    for row, h, p_end in zip(pos, h_B, d["p_end"]):
        m = N - 2 * h
        np.testing.assert_array_equal(row[:h], np.arange(h))
        np.testing.assert_array_equal(row[h:N - h], np.arange(p_end - m + 1, p_end + 1))
        np.testing.assert_array_equal(row[N - h:], np.arange(L - h, L))
    assert (pos[:, h_B.min()] > h_B.min()).any()  # the middle does jump


@pytest.mark.parametrize("gaussian", ["truncated", "reference"])
def test_cream_with_f_equal_one_is_plain(gaussian):
    fn = jax.jit(functools.partial(sample, method="cream", window=N, target=N, batch=64, gaussian=gaussian))
    pos, tok = map(np.asarray, fn(jax.random.key(0)))
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(N), (64, N)))
    np.testing.assert_array_equal(tok, pos)


# ----------------------------------------------------------------------------- 2. mode frequency

@pytest.mark.parametrize("p", [0.5, 0.2])
def test_cream_continuity_fraction(p):
    batch = 4000
    d = draw("cream", seed=1, window=N, target=L, batch=batch, p_continuity=p)
    # Relativity's tail starts at N - N // 3; in continuity mode that slot is still in the middle,
    # which ends at <= L - k - 1, so it sits below L - N // 3 unless alpha hits f exactly.
    relativity = d["position_ids"][:, N - N // 3] == L - N // 3
    np.testing.assert_array_equal(~relativity, d["continuity"])
    test = stats.binomtest(int((~relativity).sum()), batch, p)
    print(f"continuity p={p}: {(~relativity).mean():.4f}, binomtest p-value {test.pvalue:.3g}")
    assert test.pvalue > P_MIN


# ----------------------------------------------------------------------------- 3. alpha distribution

# At f = 4 a clipped normal would put 32% of its mass on the ends; at f = 16 only 1%.
@pytest.mark.parametrize("target, sigma_scale, std, clipped_differs", [
    (4 * N, "absolute", 1.5, True), (16 * N, "relative", 3.0, False)])
def test_cream_alpha_is_truncated_normal(target, sigma_scale, std, clipped_differs):
    f = target // N
    alpha = draw("cream", seed=f, window=N, target=target, batch=20000, sigma_scale=sigma_scale,
                 p_continuity=0.0)["alpha"].astype(np.float64)
    mu = (1 + f) / 2
    law = stats.truncnorm((1 - mu) / std, (f - mu) / std, loc=mu, scale=std)
    p_ok = stats.kstest(alpha, law.cdf).pvalue
    # power: the same test rejects a clipped normal, a uniform and the wrong std
    rng = np.random.default_rng(0)
    p_clipped = stats.kstest(np.clip(rng.normal(mu, std, 20000), 1, f), law.cdf).pvalue
    p_uniform = stats.kstest(alpha, stats.uniform(1, f - 1).cdf).pvalue
    wrong_std = stats.truncnorm((1 - mu) / (2 * std), (f - mu) / (2 * std), loc=mu, scale=2 * std)
    p_wrong_std = stats.kstest(alpha, wrong_std.cdf).pvalue
    print(f"f={f} {sigma_scale}: KS p {p_ok:.3g}; clipped {p_clipped:.2g}, uniform {p_uniform:.2g}, "
          f"2x std {p_wrong_std:.2g}")
    assert alpha.min() >= 1 and alpha.max() <= f
    assert p_ok > P_MIN
    assert max(p_uniform, p_wrong_std) < P_POWER
    assert p_clipped < P_POWER or not clipped_differs


# ----------------------------------------------------------------------------- 4. reference gaussian

def numpy_reference_r(rng, f, sigma, size):
    """CREAM's reference sampler ('reference'): interpolate a uniform draw through the unnormalised normal
    CDF (mean 1 + f, std sigma) on a 1000-point grid over [2, 2f]; floor to an integer."""
    grid = np.linspace(2, 2 * f, 1000)
    cdf = stats.norm.cdf(grid, loc=1 + f, scale=sigma)
    return np.floor(np.interp(rng.uniform(0, 1, size), cdf, grid)).astype(int)


@pytest.mark.parametrize("f", [4, 8])
def test_cream_reference_gaussian_matches_numpy_port(f):
    size = 20000
    alpha = draw("cream", seed=4, window=N, target=f * N, batch=size, gaussian="reference",
                 p_continuity=0.0)["alpha"]
    r = 2 * alpha
    np.testing.assert_array_equal(r, np.round(r))  # alpha is a half-integer
    r = r.astype(int)
    port = numpy_reference_r(np.random.default_rng(f), f, 3.0, size)
    values = np.arange(2, 2 * f + 1)
    count = lambda x: np.array([(x == v).sum() for v in values])  # noqa: E731
    assert r.min() >= 2 and r.max() <= 2 * f
    assert count(r)[-1] > 0  # the clipped upper tail piles on r = 2f
    p_ok = stats.chi2_contingency(np.stack([count(r), count(port)])).pvalue
    # power: the truncated mode's alpha, discretised the same way, is a different law
    trunc = draw("cream", seed=5, window=N, target=f * N, batch=size, p_continuity=0.0)["alpha"]
    p_trunc = stats.chi2_contingency(np.stack([count(np.floor(2 * trunc)), count(port)]) + 1).pvalue
    print(f"f={f}: reference chi2 p {p_ok:.3g}; truncated-vs-reference p {p_trunc:.2g}")
    assert p_ok > P_MIN
    assert p_trunc < P_POWER


# ----------------------------------------------------------------------------- 5. middle end

@pytest.mark.parametrize("alpha", [1.0, 2.5, 4.0])
def test_middle_end_is_uniform_on_its_range(alpha):
    h = t = N // 3
    m = N - h - t
    lo, hi = int(np.floor(h + alpha * (m - 1))), int(np.floor(alpha * N)) - t - 1
    end = jax.jit(jax.vmap(lambda k: _middle_end(k, jnp.float32(alpha), jnp.int32(h), jnp.int32(m),
                                                 jnp.int32(t), N, L)))
    p_end = np.asarray(end(jax.random.split(jax.random.key(6), 20000)))
    assert p_end.min() == lo and p_end.max() == hi
    if lo == hi:
        assert lo == N - t - 1
        return
    p = stats.chisquare(np.bincount(p_end - lo, minlength=hi - lo + 1)).pvalue
    print(f"alpha={alpha}: P_e in [{lo}, {hi}], chi2 p {p:.3g}")
    assert p > P_MIN


def test_cream_middle_end_bounds_follow_alpha():
    d = draw("cream", seed=7, window=N, target=L, batch=4000)
    alpha, h, p_end = d["alpha"].astype(np.float64), d["h"], d["p_end"]
    m = N - 2 * h
    lo, hi = np.floor(h + alpha * (m - 1)), np.floor(alpha * N) - h - 1
    assert (p_end >= lo - 1).all() and (p_end <= hi + 1).all()  # one unit of float32 slack
    assert ((p_end == lo) | (p_end == hi)).mean() > 0.02  # draws do reach the ends


# ----------------------------------------------------------------------------- 6. PoSE

def test_pose_l1_and_skip_are_uniform():
    d = draw("pose", seed=8, window=N, target=L, batch=20000)
    pos, l1, u = d["position_ids"], d["l1"], d["u"]
    i = np.arange(N)
    np.testing.assert_array_equal(pos, np.where(i < l1[:, None], i, i + u[:, None]))
    assert_rising_in_range(pos, L)
    assert l1.min() == 1 and l1.max() == (N + 1) // 2 and u.min() == 0 and u.max() == L - N
    p_l1 = stats.chisquare(np.bincount(l1 - 1)).pvalue
    p_u = stats.chisquare(np.bincount(u)).pvalue
    print(f"pose: l1 chi2 p {p_l1:.3g}, u chi2 p {p_u:.3g}")
    assert min(p_l1, p_u) > P_MIN


def test_pose_offsets_take_a_uniform_later_span():
    n = 100
    d = draw("pose", seed=9, window=N, target=L, batch=20000, content="offsets",
             doc_lengths=np.full(20000, n, np.int32))
    tok, l1, u, v = d["token_index"], d["l1"], d["u"], d["v"]
    i = np.arange(N)
    np.testing.assert_array_equal(tok, np.where(i < l1[:, None], i, i + v[:, None]))
    assert tok.min() >= 0 and tok.max() < n
    assert (v[u <= n - N] == u[u <= n - N]).all()
    p_v = stats.chisquare(np.bincount(v, minlength=n - N + 1)).pvalue
    print(f"pose offsets: v chi2 p {p_v:.3g}")
    assert p_v > P_MIN


# ----------------------------------------------------------------------------- 7. RandPos

def test_randpos_inclusion_is_uniform():
    pos = draw("randpos", seed=10, window=N, target=L, batch=4000)["position_ids"]
    assert_rising_in_range(pos, L)  # strictly rising: distinct and sorted
    # each count is Binomial(batch, N / L): chisquare's Poisson variance would overstate it by L / (L - N)
    count, q = np.bincount(pos.ravel(), minlength=L), N / L
    stat = (((count - len(pos) * q) ** 2) / (len(pos) * q * (1 - q))).sum()
    p = stats.chi2.sf(stat, L - 1)
    print(f"randpos: inclusion chi2 p {p:.3g}")
    assert p > P_MIN


# ----------------------------------------------------------------------------- 8. CREAM offsets

def test_cream_offsets_token_index():
    batch = 2000
    n = np.random.default_rng(11).integers(N, L + 1, batch).astype(np.int32)
    d = draw("cream", seed=11, window=N, target=L, batch=batch, content="offsets", doc_lengths=n)
    pos, tok, h, p_end = d["position_ids"], d["token_index"], d["h"], d["p_end"]
    short = p_end >= n
    assert 0 < short.sum() < batch  # both branches of the short-document rule
    for row_p, row_t, h_, n_, late in zip(pos, tok, h, n, short):
        m = N - 2 * h_
        np.testing.assert_array_equal(row_t[:h_], np.arange(h_))
        np.testing.assert_array_equal(row_t[h_:N - h_], np.arange(n_ - h_ - m, n_ - h_) if late
                                      else row_p[h_:N - h_])
        np.testing.assert_array_equal(row_t[N - h_:], np.arange(n_ - h_, n_))
        assert row_t.min() >= 0 and row_t.max() < n_


def test_cream_offsets_full_length_documents_use_the_positions():
    d = draw("cream", seed=12, window=N, target=L, batch=256, content="offsets")
    np.testing.assert_array_equal(d["token_index"], d["position_ids"])


def test_doc_lengths_may_be_traced():
    fn = jax.jit(lambda key, n: sample(key, "cream", window=N, target=L, batch=4, content="offsets",
                                       doc_lengths=n))
    _, tok = fn(jax.random.key(0), jnp.array([N, 80, 200, L], jnp.int32))
    assert (np.asarray(tok).max(axis=1) < [N, 80, 200, L]).all()


# ----------------------------------------------------------------------------- 9. validation

@pytest.mark.parametrize("method, kw, needle", [
    ("cream", dict(window=64, target=100), "target=100"),
    ("cream", dict(window=64, target=100), "window=64"),
    ("bogus", {}, "'bogus'"),
    ("cream", dict(temperature=1.0), "'temperature'"),
    ("randpos", dict(content="offsets"), "'content'"),
    ("cream", dict(gaussian="clipped"), "'clipped'"),
    ("cream", dict(gaussian="clipped"), "truncated, reference"),
    ("cream", dict(sigma_scale="log"), "'log'"),
    ("cream", dict(content="shuffled"), "'shuffled'"),
    ("pose", dict(content="shuffled"), "contiguous, offsets"),
    ("cream", dict(k=32), "k=32"),
    ("cream", dict(p_continuity=1.5), "1.5"),
    ("cream", dict(p_continuity=-0.1), "-0.1"),
    ("cream", dict(sigma=0.0), "0.0"),
    ("cream", dict(content="offsets", doc_lengths=np.full(4, 300)), "300"),
    ("full", dict(window=64, target=128), "window=64"),
    ("pose", dict(window=128, target=64), "target (64)"),
])
def test_bad_arguments_raise_naming_the_value(method, kw, needle):
    args = dict(window=N, target=L, batch=4) | kw
    with pytest.raises(ValueError) as err:
        sample(jax.random.key(0), method, **args)
    assert needle in str(err.value)


def test_non_integer_ratio_message_names_the_fix():
    with pytest.raises(ValueError, match=r"multiple of window, e.g. target=64 or target=128"):
        sample(jax.random.key(0), "cream", window=64, target=100, batch=2)


# ----------------------------------------------------------------------------- 10. keys

@pytest.mark.parametrize("method", ["cream", "pose", "randpos"])
def test_fresh_draw_per_step_and_determinism(method):
    fn = jax.jit(functools.partial(sample, method=method, window=N, target=L, batch=8))
    key = jax.random.key(42)
    step0, step1 = (np.asarray(fn(fold_step(key, s))[0]) for s in (0, 1))
    assert not np.array_equal(step0, step1)
    np.testing.assert_array_equal(step0, np.asarray(fn(fold_step(key, 0))[0]))
    np.testing.assert_array_equal(np.asarray(fn(key)[0]), np.asarray(fn(jax.random.key(42))[0]))
