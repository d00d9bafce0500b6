"""Property tests for vitpool.pooling: the pure, batched token-pooling functions.

Every test asserts something a wrong implementation would get wrong; data is small so the file runs fast.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vitpool import iterate
from vitpool import pooling as P

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# name -> (function, weighted by significance?)
CLUSTERING = {
    "kmedoids": (P.kmedoids, False),
    "wkmedoids": (P.wkmedoids, True),
    "kmeans": (P.kmeans, False),
    "wkmeans": (P.wkmeans, True),
}
MEDOIDS = ["kmedoids", "wkmedoids"]
MEANS = ["kmeans", "wkmeans"]
SELECTION = ["importance", "select"]

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


# ----------------------------------------------------------------------------------------------- helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor, so that equality is bitwise (-0.0 != 0.0)."""
    return t.contiguous().view(_INT_VIEW[t.dtype])


def row_matches(tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, K, N]: output row k of item b is bitwise equal to input row n of the same item."""
    return (bits(tokens).unsqueeze(2) == bits(x).unsqueeze(1)).all(-1)


def sq_dist64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 [B, N, K] in float64, computed directly (no expansion trick)."""
    return ((x.double().unsqueeze(2) - y.double().unsqueeze(1)) ** 2).sum(-1)


def well_separated(x: torch.Tensor) -> bool:
    """No two tokens closer than float32 can resolve through ||x||^2 - 2<x,y> + ||y||^2 (Gram-matrix distances)."""
    d = sq_dist64(x, x) + torch.eye(x.shape[1], dtype=torch.float64) * 1e300
    return bool((d.amin(-1) > 1e-4 * (x.double() ** 2).sum(-1).amax(-1, keepdim=True)).all())


def make_tokens(seed: int, b: int, n: int, c: int, mode: str, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if mode == "separated":  # a few far-apart centres plus small noise
        m = max(1, n // 3)
        centres = torch.randn(b, m, c, generator=g) * 10
        label = torch.randint(0, m, (b, n), generator=g)
        x = centres.gather(1, label.unsqueeze(-1).expand(-1, -1, c)) + 0.05 * torch.randn(b, n, c, generator=g)
    elif mode == "arbitrary":
        x = torch.randn(b, n, c, generator=g)
    elif mode == "duplicates":  # 1..3 distinct rows, each repeated many times
        m = int(torch.randint(1, 4, (), generator=g))
        distinct = torch.randn(b, m, c, generator=g)
        label = torch.randint(0, m, (b, n), generator=g)
        x = distinct.gather(1, label.unsqueeze(-1).expand(-1, -1, c))
    else:
        raise AssertionError(mode)
    return x * scale


def make_significance(seed: int, b: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.rand(b, n, generator=g) + 0.05  # strictly positive, distinct with probability 1


@st.composite
def cases(draw, modes=("separated", "arbitrary"), max_b=3, min_n=2, max_n=20, max_c=6):
    seed = draw(st.integers(0, 2**31 - 1))
    b = draw(st.integers(1, max_b))
    n = draw(st.integers(min_n, max_n))
    c = draw(st.integers(1, max_c))
    k = draw(st.integers(1, n))
    mode = draw(st.sampled_from(modes))
    scale = draw(st.sampled_from([0.01, 1.0, 100.0]))
    return make_tokens(seed, b, n, c, mode, scale), make_significance(seed, b, n), k


def run_method(name: str, x: torch.Tensor, k: int, sig: torch.Tensor, iters: int = 3) -> P.Pooled:
    if name in CLUSTERING:
        return CLUSTERING[name][0](x, k, sig, iters)
    if name == "importance":
        return P.importance(x, k, sig)
    if name == "select":
        return P.select(x, k, -sig)  # different scores from importance
    raise AssertionError(name)


def explicit_weighted_means(x: torch.Tensor, w: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Python-loop reference in float64; NaN for clusters without members."""
    b, _, c = x.shape
    out = torch.full((b, k, c), float("nan"), dtype=torch.float64)
    for i in range(b):
        for j in range(k):
            member = assign[i] == j
            if member.any():
                ww = w[i][member].double()
                out[i, j] = (ww.unsqueeze(-1) * x[i][member].double()).sum(0) / ww.sum()
    return out


# ------------------------------------------------------------------------------- medoid outputs are tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", MEDOIDS)
@settings(max_examples=15, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary", "duplicates")), iters=st.integers(0, 4))
def test_medoid_outputs_are_bitwise_input_tokens(name, dtype, case, iters):
    x, sig, k = case
    x = x.to(dtype)
    out = CLUSTERING[name][0](x, k, sig, iters)
    assert out.tokens.dtype == dtype
    assert out.tokens.shape == (x.shape[0], k, x.shape[2])
    assert row_matches(out.tokens, x).any(-1).all(), "a medoid output is not one of its batch item's input tokens"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", MEANS)
def test_kmeans_keeps_low_precision_dtype(name, dtype):
    x = make_tokens(0, 2, 12, 4, "separated").to(dtype)
    out = CLUSTERING[name][0](x, 4, make_significance(0, 2, 12), 3)
    assert out.tokens.dtype == dtype
    assert torch.isfinite(out.tokens).all()
    # the centres still reconstruct the (well separated) data: close to every token's true centre
    err = P.reconstruction_error(x, out.tokens)
    assert (err < P.reconstruction_error(x, torch.zeros_like(out.tokens))).all()


# ---------------------------------------------------------------------------- weighted means and the hull


@settings(max_examples=40, **SETTINGS)
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3),
    n=st.integers(1, 16),
    k=st.integers(1, 8),
    c=st.integers(1, 5),
    drop=st.booleans(),
)
def test_cluster_means_lie_in_cluster_hull_and_empty_clusters_are_zero(seed, b, n, k, c, drop):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g) * 10
    w = torch.rand(b, n, generator=g) + 1e-3
    assign = torch.randint(-1 if drop else 0, k, (b, n), generator=g)
    means, mass = P.cluster_means(x, w, assign, k)
    assert means.shape == (b, k, c) and mass.shape == (b, k)
    assert torch.isfinite(means).all(), "empty cluster produced NaN/inf"
    expected = explicit_weighted_means(x, w, assign, k)
    for i in range(b):
        for j in range(k):
            member = assign[i] == j
            assert mass[i, j].item() == pytest.approx(w[i][member].sum().item(), rel=1e-6, abs=0)
            if not member.any():
                assert (means[i, j] == 0).all()
                continue
            lo, hi = x[i][member].min(0).values, x[i][member].max(0).values
            tol = 1e-5 * (hi.abs() + lo.abs()) + 1e-6
            assert (means[i, j] >= lo - tol).all() and (means[i, j] <= hi + tol).all()
            torch.testing.assert_close(means[i, j].double(), expected[i, j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MEANS)
@settings(max_examples=20, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary", "duplicates")), t=st.integers(0, 3))
def test_kmeans_centres_are_weighted_means_in_hull_of_previous_assignment(name, case, t):
    x, sig, k = case
    fn, weighted = CLUSTERING[name]
    prev, nxt = fn(x, k, sig, t), fn(x, k, sig, t + 1)
    assert torch.isfinite(nxt.tokens).all(), "empty cluster produced NaN/inf"
    w = sig if weighted else torch.ones_like(sig)
    expected = explicit_weighted_means(x, w, prev.assign, k)
    for i in range(x.shape[0]):
        for j in range(k):
            member = prev.assign[i] == j
            centre = nxt.tokens[i, j]
            if not member.any():  # an empty cluster keeps its centre
                assert torch.equal(centre, prev.tokens[i, j])
                continue
            lo, hi = x[i][member].min(0).values, x[i][member].max(0).values
            tol = 1e-5 * (hi.abs() + lo.abs()) + 1e-6
            assert (centre >= lo - tol).all() and (centre <= hi + tol).all(), "centre outside its cluster's hull"
            torch.testing.assert_close(centre.double(), expected[i, j], rtol=1e-4, atol=1e-5 * x.abs().max().item())


def test_wkmeans_zero_significance_cluster_does_not_collapse_to_origin():
    x = torch.tensor([[[0.0, 0.0], [100.0, 100.0], [101.0, 100.0], [100.0, 101.0]]])
    sig = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    out = P.wkmeans(x, 2, sig, iters=1)
    # the second cluster {1, 2, 3} lies far from the origin: its centre must stay in that cluster's hull
    assert (out.tokens[0, 1] >= 99.0).all(), out.tokens


# ----------------------------------------------------------------------------- monotone objective


def _error_sequence(name, x, k, sig, iters):
    fn, weighted = CLUSTERING[name]
    w = sig if weighted else None
    return [P.reconstruction_error(x, fn(x, k, sig, t).tokens, w) for t in range(iters + 1)], w


@pytest.mark.parametrize("name", list(CLUSTERING))
@settings(max_examples=20, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary")), iters=st.integers(1, 5))
def test_each_iteration_does_not_increase_reconstruction_error(name, case, iters):
    x, sig, k = case
    errors, w = _error_sequence(name, x, k, sig, iters)
    # float32 cancellation in ||x||^2 - 2<x,y> + ||y||^2 bounds how exactly an error can be evaluated
    scale = ((x.float() ** 2).sum(-1) * (1 if w is None else w)).sum(-1)
    for t in range(iters):
        before, after = errors[t], errors[t + 1]
        assert (after <= before * (1 + 1e-5) + 1e-6 * scale + 1e-12).all(), (t, before, after)


@pytest.mark.parametrize("name", list(CLUSTERING))
def test_iterations_fix_a_bad_initialisation(name):
    # 1-D points {0, 1} and {10, 11}; the two most significant tokens (0 and 1) are a bad start
    x = torch.tensor([[[0.0], [1.0], [10.0], [11.0]]])
    sig = torch.tensor([[1.0, 0.9, 0.8, 0.7]])
    errors, _ = _error_sequence(name, x, 2, sig, 3)
    assert errors[-1].item() < 0.05 * errors[0].item()


# ------------------------------------------------------------------------------------------ K = N


@pytest.mark.parametrize("name", MEDOIDS + SELECTION)
@settings(max_examples=15, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary")))
def test_k_equal_n_keeps_every_token_exactly(name, case):
    x, sig, _ = case
    assume(well_separated(x))
    n = x.shape[1]
    out = run_method(name, x, n, sig)
    match = row_matches(out.tokens, x)  # [B, N, N]
    # a permutation: every output is one input and every input appears exactly once
    assert (match.sum(-1) >= 1).all() and (match.sum(1) >= 1).all()
    assert torch.equal(torch.sort(bits(out.tokens).view(-1)).values, torch.sort(bits(x).view(-1)).values)
    assert (out.assign >= 0).all()
    assert torch.equal(P.gather_tokens(out.tokens, out.assign), x), "a token is not represented by itself"


@pytest.mark.parametrize("name", MEANS)
@settings(max_examples=15, **SETTINGS)
@given(case=cases(modes=("arbitrary",)))
def test_kmeans_with_k_equal_n_reproduces_every_token(name, case):
    x, sig, _ = case
    assume(well_separated(x))
    n = x.shape[1]
    out = CLUSTERING[name][0](x, n, sig, 3)
    d = sq_dist64(x, out.tokens)  # [B, N, N]
    tol = 1e-10 + 1e-10 * (x.double() ** 2).sum(-1).max()
    assert (d.amin(-1) <= tol).all(), "some input token is not reproduced"
    assert (d.amin(1) <= tol).all(), "some output token is not an input token"
    assert torch.equal(out.assign.sort(-1).values, torch.arange(n).expand_as(out.assign)), "not one token per output"
    torch.testing.assert_close(P.gather_tokens(out.tokens, out.assign), x)


# ------------------------------------------------------------------------------------ assignments


@pytest.mark.parametrize("name", list(CLUSTERING))
@settings(max_examples=20, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary", "duplicates")), iters=st.integers(0, 4))
def test_clustering_assigns_each_token_to_its_nearest_output(name, case, iters):
    x, sig, k = case
    out = CLUSTERING[name][0](x, k, sig, iters)
    assert out.assign.dtype == torch.int64 and out.assign.shape == x.shape[:2]
    assert ((out.assign >= 0) & (out.assign < k)).all()
    d = sq_dist64(x, out.tokens)
    assigned = d.gather(2, out.assign.unsqueeze(-1)).squeeze(-1)
    norm = (x.double() ** 2).sum(-1) + (out.tokens.double() ** 2).sum(-1).amax(-1, keepdim=True)
    assert (assigned <= d.amin(-1) + 1e-5 * norm + 1e-12).all(), "a token is not assigned to its nearest output"


@pytest.mark.parametrize("name", MEDOIDS)
@settings(max_examples=20, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary", "duplicates")), means=st.booleans())
def test_no_iteration_joins_every_other_token_to_the_nearest_of_the_k_most_significant(name, case, means):
    """With 0 iterations only the distances to the seeds are computed: each of the k most significant tokens is its
    own output's member (also beside an exact duplicate), every other token joins its nearest seed (ties to the
    more significant), and mean outputs are the clusters' weighted means."""
    x, sig, k = case
    size = torch.arange(x.shape[1], dtype=torch.float32).remainder(3).add(1).expand_as(sig)
    out = CLUSTERING[name][0](x, k, sig, 0, means=means, size=size)
    seeds = sig.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(out.assign.gather(1, seeds), torch.arange(k).expand_as(seeds))
    d = sq_dist64(x, P.gather_tokens(x, seeds))  # [B, N, K]
    nearest = d.argmin(-1)
    others = torch.ones_like(out.assign, dtype=torch.bool).scatter(1, seeds, False)
    norm = (x.double() ** 2).sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
    assigned = d.gather(2, out.assign.unsqueeze(-1)).squeeze(-1)
    assert (assigned <= d.amin(-1) + 1e-5 * norm.squeeze(-1) + 1e-12).all(), "a token did not join its nearest seed"
    if well_separated(x):
        assert torch.equal(out.assign[others], nearest[others])
    if not means:
        assert torch.equal(bits(out.tokens), bits(P.gather_tokens(x, seeds)))
        return
    weight = size * sig if CLUSTERING[name][1] else size
    expected = explicit_weighted_means(x, weight, out.assign, k)
    has_weight = ~torch.isnan(expected[..., 0])
    torch.testing.assert_close(out.tokens.double()[has_weight], expected[has_weight], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CLUSTERING))
@settings(max_examples=25, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary"), min_n=3), spread=st.integers(1, 6))
def test_spread_seeds_are_the_tokens_the_most_significant_represent_worst(name, case, spread):
    """With `spread` s, the seeds (the outputs before any iteration) are the k - s most significant tokens and the
    s others of largest significance times distance to the nearest of those, s at most k // 2."""
    x, sig, k = case
    assume(well_separated(x))  # float32 distances of near tokens are rounding noise, which the ranking would read
    s = min(spread, k // 2)
    first = sig.topk(k - s, dim=-1).indices
    error = sig.double() * sq_dist64(x, P.gather_tokens(x, first)).amin(-1).sqrt()
    error = error.scatter(1, first, -1.0)  # the first seeds are not candidates
    ranked = error.sort(-1, descending=True).values
    if s:  # a near-tie between the s-th and the next candidate may resolve either way in float32
        assume(bool((ranked[:, s - 1] - ranked[:, s] > 1e-3 * ranked[:, 0] + 1e-9).all()))
    expected = torch.cat([first, error.topk(s, dim=-1).indices], 1).sort(-1).values
    function, _ = CLUSTERING[name]
    out = function(x, k, sig, 0, spread=spread)
    assert torch.equal(bits(out.tokens), bits(P.gather_tokens(x, expected)))
    assert torch.equal(out.assign.gather(1, expected), torch.arange(k).expand_as(expected))


def test_a_distinct_region_gets_a_spread_seed_where_top_k_puts_every_seed_in_one_region():
    """Ten attended tokens around the origin and three less attended ones far away, four seeds: top-K seeds the
    origin four times and the far tokens join it; one spread seed goes to the far region instead."""
    near = torch.tensor([[0.1 * i, 0.0] for i in range(10)])
    far = torch.tensor([[10.0, 10.0], [10.1, 10.0], [10.0, 10.1]])
    x = torch.cat([near, far]).unsqueeze(0)
    sig = torch.cat([torch.linspace(1.0, 0.5, 10), torch.tensor([0.3, 0.2, 0.1])]).unsqueeze(0)
    top_k, spread = (P.kmedoids(x, 4, sig, 0, means=True, spread=s) for s in (0, 1))
    assert top_k.assign[0, 10:].unique().numel() == 1 and top_k.assign[0, 10] in top_k.assign[0, :10]
    assert spread.assign[0, 10:].unique().numel() == 1 and spread.assign[0, 10] not in spread.assign[0, :10]
    assert P.reconstruction_error(x, spread.tokens, sig) < P.reconstruction_error(x, top_k.tokens, sig) / 10


@pytest.mark.parametrize("name", SELECTION)
@settings(max_examples=20, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary", "duplicates")))
def test_selection_assignment(name, case):
    x, sig, k = case
    out = run_method(name, x, k, sig)
    kept = out.assign >= 0
    assert (kept.sum(-1) == k).all(), "selection must keep exactly k tokens"
    assert (out.assign[~kept] == -1).all()
    assert (out.assign < k).all()
    # kept tokens are represented by themselves, and each output is used by exactly one token
    for i in range(x.shape[0]):
        a = out.assign[i][kept[i]]
        assert torch.equal(a.sort().values, torch.arange(k))
        assert torch.equal(bits(out.tokens[i][a]), bits(x[i][kept[i]]))


@pytest.mark.parametrize("method", MEDOIDS)
def test_mean_outputs_never_make_a_token_of_nothing(method):
    """Two exact duplicates both among the top-K: the later medoid's cluster is empty (its token goes to the earlier
    one), and its output stays its medoid rather than the mean of no token (zeros)."""
    x = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0)) + 3  # no token near zero
    x[0, 3] = x[0, 1]
    significance = torch.tensor([[1.0, 5.0, 0.5, 4.0, 0.1, 0.2]])  # tokens 1, 3 and 0 start as medoids
    pooled = getattr(P, method)(x, 3, significance, iters=2, means=True)
    assert row_matches(pooled.tokens, x).any(-1)[0, 2], "the empty cluster's output is not its medoid"
    assert not (pooled.assign == 2).any() and (pooled.tokens.abs().sum(-1) > 1).all()
    weighted_out = getattr(P, method)(x, 3, torch.tensor([[1.0, 5.0, 0.0, 4.0, 0.0, 0.0]]), iters=0, means=True)
    assert torch.isfinite(weighted_out.tokens).all() and (weighted_out.tokens.abs().sum(-1) > 1).all()


@pytest.mark.parametrize("name", list(CLUSTERING) + SELECTION + ["tome"])
@settings(max_examples=10, **SETTINGS)
@given(case=cases(modes=("duplicates",), min_n=4, max_n=16))
def test_duplicate_tokens_and_k_above_distinct_count(name, case):
    x, sig, k = case
    n = x.shape[1]
    distinct = torch.unique(x[0], dim=0).shape[0]
    k = max(k, min(n, distinct + 1), n - n // 2) if name == "tome" else max(k, min(n, distinct + 1))
    out = P.tome(x, k) if name == "tome" else run_method(name, x, k, sig)
    assert torch.isfinite(out.tokens).all()
    assert out.tokens.shape == (x.shape[0], k, x.shape[2])
    if name in SELECTION:
        assert ((out.assign >= -1) & (out.assign < k)).all()
    else:
        assert ((out.assign >= 0) & (out.assign < k)).all()
    if name in MEDOIDS or name in SELECTION:
        assert row_matches(out.tokens, x).any(-1).all()
    elif name == "tome":  # cosine matching may merge distinct rows; still no output is left without members
        assert torch.equal(torch.unique(out.assign), torch.arange(k))
    else:  # centres are weighted means of tokens: inside the tokens' bounding box, no worse than the start
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        tol = 1e-5 * (lo.abs() + hi.abs())
        assert ((out.tokens >= lo - tol) & (out.tokens <= hi + tol)).all()
        start = CLUSTERING[name][0](x, k, sig, 0).tokens
        assert torch.equal(bits(start), bits(x.gather(1, P.top_k_indices(sig, k).unsqueeze(-1).expand_as(start))))
        w = sig if CLUSTERING[name][1] else None
        err, err0 = P.reconstruction_error(x, out.tokens, w), P.reconstruction_error(x, start, w)
        assert (err <= err0 * (1 + 1e-5) + 1e-6 * (x**2).sum((1, 2))).all()


# ------------------------------------------------------------------------------------ pairwise distances


@settings(max_examples=40, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary", "duplicates"), max_n=40, max_c=16))
def test_pairwise_distances_are_exact_where_they_must_be(case):
    x, _, _ = case
    d = P.pairwise_squared_distances(x)
    assert (d >= 0).all()
    exact = sq_dist64(x, x)
    scale = (x.double() ** 2).sum(-1).amax(-1).view(-1, 1, 1)
    assert ((d.double() - exact).abs() <= 1e-5 * scale + 1e-30).all()
    # PyTorch's CPU Gram matrix happens to be symmetric; other kernels' (ONNX Runtime, CUDA) need not be.
    gram = x @ x.transpose(1, 2)
    noise = torch.randn(gram.shape, generator=torch.Generator().manual_seed(0)).tril(-1)
    lopsided = gram + noise * 1e-3 * scale.float()
    for distances in (d, P.distances_from_gram(lopsided)):
        # exact symmetry: two tokens alone in a cluster tie exactly
        assert torch.equal(bits(distances), bits(distances.transpose(1, 2)))
        assert torch.equal(torch.diagonal(distances, dim1=1, dim2=2), torch.zeros(x.shape[:2]))


# ------------------------------------------------------------------------------- stopping at a fixed point


@pytest.mark.parametrize("name", list(CLUSTERING))
@settings(max_examples=25, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary", "duplicates")), iters=st.integers(1, 8))
def test_stopping_at_a_fixed_point_gives_the_outputs_of_every_iteration(name, case, iters):
    x, sig, k = case
    stopped = run_method(name, x, k, sig, iters)
    with iterate.every_iteration():
        every = run_method(name, x, k, sig, iters)
    assert torch.equal(bits(stopped.tokens), bits(every.tokens))
    assert torch.equal(stopped.assign, every.assign)


@pytest.mark.parametrize("name", list(CLUSTERING))
def test_eager_cpu_stops_at_the_fixed_point_and_traced_graphs_run_every_iteration(name):
    x, sig = make_tokens(3, 2, 24, 4, "separated"), make_significance(3, 2, 24)
    with iterate.counting() as steps:
        run_method(name, x, 8, sig, iters=10)
    assert len(steps) == 1 and 1 <= steps[0] < 10
    with iterate.counting() as steps:
        torch.jit.trace(lambda tokens, significance: run_method(name, tokens, 8, significance, iters=10).tokens,
                        (x, sig), check_trace=False)
    assert steps == [10]


@pytest.mark.parametrize("name", list(CLUSTERING))
def test_exported_graph_that_stops_at_the_fixed_point_gives_every_iterations_outputs(name):
    class Pool(torch.nn.Module):
        def forward(self, x, sig):
            pooled = run_method(name, x, 6, sig, iters=6)
            return pooled.tokens, pooled.assign

    shape = (2, 24, 4)
    example = (make_tokens(0, *shape, "arbitrary"), make_significance(0, 2, 24))
    with iterate.graphs_stop_at_fixed_point():
        program = torch.export.export(Pool(), example)
    assert sum(node.target is torch.ops.higher_order.cond for node in program.graph.nodes) == 1  # the conditions nest
    unrolled = torch.export.export(Pool(), example)
    assert not any(node.target is torch.ops.higher_order.cond for node in unrolled.graph.nodes)
    iterations = []
    for seed, mode in [(s, m) for s in range(4) for m in ("separated", "arbitrary", "duplicates")]:
        x, sig = make_tokens(seed, *shape, mode), make_significance(seed, 2, 24)
        tokens, assign = program.module()(x, sig)
        every_tokens, every_assign = unrolled.module()(x, sig)  # exported sums add in another order than eager's
        assert torch.equal(bits(tokens), bits(every_tokens)) and torch.equal(assign, every_assign)
        with iterate.counting() as steps:
            run_method(name, x, 6, sig, iters=6)
        iterations += steps
    assert min(iterations) < 6 and max(iterations) > 1  # some inputs stop early, some need several iterations


# -------------------------------------------------------------------------- determinism and batching


ALL_METHODS = list(CLUSTERING) + ["kmedoids, no iteration"] + SELECTION + ["tome", "grid"]


def _run_any(name, x, k, sig):
    if name == "kmedoids, no iteration":
        return P.kmedoids(x, k, sig, iters=0, means=True, size=sig)
    if name == "tome":
        return P.tome(x, max(k, x.shape[1] - x.shape[1] // 2), metric=x.flip(-1), size=sig)
    if name == "grid":
        return P.grid(x, (4, 4), (2, 3))
    return run_method(name, x, k, sig)


@pytest.mark.parametrize("name", ALL_METHODS)
@settings(max_examples=8, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary", "duplicates"), min_n=16, max_n=16))
def test_deterministic(name, case):
    x, sig, k = case
    first = _run_any(name, x.clone(), k, sig.clone())
    second = _run_any(name, x.clone(), k, sig.clone())
    assert torch.equal(bits(first.tokens), bits(second.tokens))
    assert torch.equal(first.assign, second.assign)


@pytest.mark.parametrize("name", ALL_METHODS)
@settings(max_examples=8, **SETTINGS)
@given(case=cases(modes=("separated", "arbitrary"), min_n=16, max_n=16))
def test_batch_items_do_not_interact(name, case):
    x, sig, k = case
    x = torch.cat([x, make_tokens(1, 3, 16, x.shape[2], "arbitrary")])[:3] if x.shape[0] < 3 else x
    sig = torch.cat([sig, make_significance(1, 3, 16)])[:3] if sig.shape[0] < 3 else sig
    batched = _run_any(name, x, k, sig)
    for i in range(3):
        alone = _run_any(name, x[i : i + 1], k, sig[i : i + 1])
        assert torch.equal(batched.assign[i], alone.assign[0])
        if name in MEDOIDS or name in SELECTION:
            assert torch.equal(bits(batched.tokens[i]), bits(alone.tokens[0]))
        else:
            torch.testing.assert_close(batched.tokens[i], alone.tokens[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ALL_METHODS)
def test_non_finite_input_raises(name, bad):
    x = make_tokens(3, 2, 16, 4, "arbitrary")
    x[1, 5, 2] = bad
    with pytest.raises(ValueError, match="NaN"):
        _run_any(name, x, 8, make_significance(3, 2, 16))


# ---------------------------------------------------------------------------------------- importance


@settings(max_examples=30, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), n=st.integers(1, 20), data=st.data())
def test_importance_keeps_the_top_k_in_token_order(seed, b, n, data):
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 3, generator=g)
    sig = torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).float()  # distinct scores
    out = P.importance(x, k, sig)
    for i in range(b):
        top = sorted(sorted(range(n), key=lambda j: -sig[i, j].item())[:k])
        assert torch.equal(out.tokens[i], x[i, top])
        expected = torch.full((n,), -1, dtype=torch.int64)
        expected[top] = torch.arange(k)
        assert torch.equal(out.assign[i], expected)


# ----------------------------------------------------------------------------------------------- grid


def test_grid_equals_explicit_average_pooling():
    x = make_tokens(5, 3, 16, 7, "arbitrary")
    out = P.grid(x, (4, 4), (2, 2))
    expected = x.reshape(3, 2, 2, 2, 2, 7).mean(dim=(2, 4)).reshape(3, 4, 7)
    torch.testing.assert_close(out.tokens, expected)
    assert torch.equal(out.assign[0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grid_low_precision(dtype):
    x = make_tokens(5, 2, 16, 4, "arbitrary")
    out = P.grid(x.to(dtype), (4, 4), (2, 2))
    assert out.tokens.dtype == dtype
    expected = x.reshape(2, 2, 2, 2, 2, 4).mean(dim=(2, 4)).reshape(2, 4, 4)
    torch.testing.assert_close(out.tokens.float(), expected, rtol=2e-2, atol=2e-2)


@settings(max_examples=40, **SETTINGS)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), data=st.data())
def test_grid_partitions_non_dividing_grids(rows, cols, data):
    out_rows, out_cols = data.draw(st.integers(1, rows)), data.draw(st.integers(1, cols))
    k = out_rows * out_cols
    cell = P.grid_assignment((rows, cols), (out_rows, out_cols), torch.device("cpu"))
    assert cell.shape == (rows * cols,)
    assert torch.equal(torch.unique(cell), torch.arange(k)), "some output cell has no token"
    # every block is a rectangle; blocks in the same output row/column share rows/columns; sizes differ by <= 1
    grid2d = cell.view(rows, cols)
    heights, widths = set(), set()
    for j in range(k):
        r, c = torch.nonzero(grid2d == j, as_tuple=True)
        r_set, c_set = sorted(set(r.tolist())), sorted(set(c.tolist()))
        assert len(r) == len(r_set) * len(c_set), "block is not a rectangle"
        assert r_set == list(range(r_set[0], r_set[-1] + 1)) and c_set == list(range(c_set[0], c_set[-1] + 1))
        heights.add(len(r_set))
        widths.add(len(c_set))
    assert max(heights) - min(heights) <= 1 and max(widths) - min(widths) <= 1
    # row-major order of the cells
    assert (grid2d[:, 1:] >= grid2d[:, :-1]).all() and (grid2d[1:, :] >= grid2d[:-1, :]).all()
    x = make_tokens(rows * 31 + cols, 2, rows * cols, 3, "arbitrary")
    out = P.grid(x, (rows, cols), (out_rows, out_cols))
    assert torch.equal(out.assign, cell.expand(2, -1))
    expected = explicit_weighted_means(x, torch.ones(2, rows * cols), out.assign, k)
    torch.testing.assert_close(out.tokens.double(), expected, rtol=1e-5, atol=1e-6)


def test_grid_5x5_to_2x2():
    cell = P.grid_assignment((5, 5), (2, 2), torch.device("cpu")).view(5, 5)
    counts = torch.bincount(cell.reshape(-1), minlength=4)
    assert counts.sum() == 25 and (counts > 0).all()
    x = torch.arange(25.0).view(1, 25, 1)
    out = P.grid(x, (5, 5), (2, 2))
    for j in range(4):
        assert out.tokens[0, j, 0].item() == pytest.approx(x[0, cell.reshape(-1) == j, 0].mean().item())


# ----------------------------------------------------------------------------------------------- tome


@st.composite
def tome_cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    b, n, c = draw(st.integers(1, 3)), draw(st.integers(2, 17)), draw(st.integers(1, 6))
    k = draw(st.integers(n - n // 2, n))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    metric = torch.randn(b, n, 5, generator=g) if draw(st.booleans()) else None
    size = torch.randint(1, 5, (b, n), generator=g).float() if draw(st.booleans()) else None
    return x, k, metric, size


@settings(max_examples=40, **SETTINGS)
@given(case=tome_cases())
def test_tome_merges_exactly_n_minus_k(case):
    x, k, metric, size = case
    b, n, _ = x.shape
    out = P.tome(x, k, metric=metric, size=size)
    assert out.tokens.shape == (b, k, x.shape[2])
    assert ((out.assign >= 0) & (out.assign < k)).all()
    w = torch.ones(b, n) if size is None else size
    expected = explicit_weighted_means(x, w, out.assign, k)
    assert not torch.isnan(expected).any(), "an output token has no members: fewer than k tokens remain"
    torch.testing.assert_close(out.tokens.double(), expected, rtol=1e-5, atol=1e-6)
    # bipartite structure: odd tokens (set B) are never merged together; a B-less output is one unmerged A token
    m = (x if metric is None else metric).double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    for i in range(b):
        members = [torch.nonzero(out.assign[i] == j).flatten().tolist() for j in range(k)]
        merged_a = []
        for mem in members:
            odd = [t for t in mem if t % 2 == 1]
            assert len(odd) <= 1
            if not odd:
                assert len(mem) == 1
            else:
                merged_a += [(t, odd[0]) for t in mem if t % 2 == 0]
        assert len(merged_a) == n - k
        # each merged A token went to its most similar B token, and the merged edges are the strongest ones
        sim = m[i, ::2] @ m[i, 1::2].T  # [Na, Nb]
        best = sim.amax(-1) if sim.shape[1] else torch.zeros(sim.shape[0])
        merged = {a for a, _ in merged_a}
        for a, bt in merged_a:
            assert sim[a // 2, bt // 2] >= best[a // 2] - 1e-5
        unmerged = [a for a in range(0, n, 2) if a not in merged]
        if merged and unmerged:
            assert min(best[a // 2] for a in merged) >= max(best[a // 2] for a in unmerged) - 1e-5
    # merged sizes: total preserved, and each output stands for the sizes of its members
    sizes = P.merged_sizes(out.assign, w, k)
    torch.testing.assert_close(sizes.sum(-1), w.sum(-1))
    assert (sizes >= 1).all()


@pytest.mark.parametrize("n", [2, 5, 8, 17])
def test_tome_refuses_to_remove_more_than_half(n):
    x = make_tokens(0, 2, n, 3, "arbitrary")
    P.tome(x, n - n // 2)  # the most it may remove
    with pytest.raises(ValueError):
        P.tome(x, n - n // 2 - 1)
    with pytest.raises(ValueError):
        P.tome(x, n + 1)


def test_tome_size_weighted_merge():
    # tokens 0 (A) and 1 (B) point the same way; 2 (A) and 3 (B) are orthogonal to them
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, -5.0]]])
    size = torch.tensor([[3.0, 1.0, 1.0, 1.0]])
    out = P.tome(x, 3, size=size)
    merged = out.assign[0, 0]
    assert out.assign[0, 1] == merged and len(set(out.assign[0].tolist())) == 3
    torch.testing.assert_close(out.tokens[0, merged], torch.tensor([1.5, 0.0]))  # (3*1 + 1*3) / 4
    torch.testing.assert_close(P.merged_sizes(out.assign, size, 3)[0].sort().values, torch.tensor([1.0, 1.0, 4.0]))


# -------------------------------------------------------------------------------------- merged_sizes


@settings(max_examples=30, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), n=st.integers(1, 16), k=st.integers(1, 8))
def test_merged_sizes_drops_unassigned_tokens(seed, b, n, k):
    g = torch.Generator().manual_seed(seed)
    assign = torch.randint(-1, k, (b, n), generator=g)
    size = torch.randint(1, 10, (b, n), generator=g).float()
    sizes = P.merged_sizes(assign, size, k)
    assert sizes.shape == (b, k)
    for i in range(b):
        for j in range(k):
            assert sizes[i, j].item() == size[i][assign[i] == j].sum().item()
    torch.testing.assert_close(sizes.sum(-1), (size * (assign >= 0)).sum(-1))


def test_merged_sizes_after_selection():
    x = make_tokens(0, 2, 10, 3, "arbitrary")
    size = torch.arange(1.0, 11.0).expand(2, -1)
    sig = make_significance(0, 2, 10)
    out = P.importance(x, 4, sig)
    sizes = P.merged_sizes(out.assign, size, 4)
    kept = P.top_k_indices(sig, 4)
    torch.testing.assert_close(sizes, size.gather(1, kept))
    assert (sizes.sum(-1) < size.sum(-1)).all()


@pytest.mark.parametrize("name", list(CLUSTERING))
def test_clustering_compiles_without_graph_breaks(name):
    # torch.compile traces the iterations whole (no eager stop, no counting): a break here would cut every
    # pooling layer of a compiled model into pieces.
    x, sig = make_tokens(3, 2, 24, 4, "separated"), make_significance(3, 2, 24)
    torch._dynamo.reset()
    with iterate.counting():
        explained = torch._dynamo.explain(lambda tokens, significance: run_method(name, tokens, 8, significance, 3).tokens)(x, sig)
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
