"""Token Pooling and its baselines as pure, batched tensor functions.

Every function takes patch tokens `x` of shape [B, N, C] (prefix tokens such as CLS are never passed in)
and returns a `Pooled` pair: the output tokens [B, K, C] and `assign` [B, N], the output index each input
token is represented by (-1 for a token that selection dropped). There is no Python loop over the batch or
the clusters, iteration counts are fixed (each clustering method is one step, which `vitpool.iterate` runs:
eager CPU runs leave out the iterations after a fixed point, which would change nothing), nothing is random
at call time, and only ops that ONNX expresses are used:
matmul, vecdot, argmin/argmax, topk, gather, index-add, cumsum, comparisons and `where`. Cluster sums are an
index-add of rows (exported as running sums over the rows sorted by cluster: `row_sums`), which `vitpool.flops`
counts as one multiply-add per element; other work that is a multiply-accumulate is written as matmul or vecdot
so that the MAC counter sees it.

Clustering runs in float32 whatever the input dtype (fp16/bf16 distances lose the argmin); medoid outputs
are gathered from the original tokens, so they are bit-exact input tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vitpool.iterate import exporting, is_tracing
from vitpool.iterate import run as iterate


class Pooled(NamedTuple):
    tokens: Tensor  # [B, K, C]
    assign: Tensor  # [B, N] int64, index into tokens, -1 where the input token was dropped


def check_finite(x: Tensor, every_device: bool = False) -> None:
    """Reject NaN/inf tokens eagerly: clustering would silently assign them to cluster 0. On a GPU the check
    would stall every pooling layer on a host sync, so there it runs once per forward pass (`every_device`,
    from `PooledBlocks` on its output, which a NaN anywhere upstream reaches)."""
    if (every_device or not x.is_cuda) and not is_tracing() and not bool(torch.isfinite(x).all()):
        raise ValueError(
            "token pooling received NaN or infinite tokens; check the model input and weights "
            "(an fp16 overflow upstream is a common cause)"
        )


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, j]] for every b, j ([B, N, C] -> [B, K, C]), read as whole rows of the flattened batch.

    A gather with an expanded [B, K, C] index exports as an Expand and a GatherElements, 13% of a K-Medoids
    layer's time in ONNX Runtime at batch 32. `embedding` is a row lookup: one ONNX Gather, where indexing
    exports as an Unsqueeze and a GatherND, and 2-5% faster than indexing in eager PyTorch."""
    batch, n = x.shape[:2]
    return F.embedding(index + batch_offsets(batch, n, x.device), x.reshape(batch * n, x.shape[2]))


def batch_offsets(batch: int, n: int, device: torch.device) -> Tensor:
    """[B, 1]: where each batch item's rows start once the batch and token axes are flattened."""
    return (torch.arange(batch, device=device) * n).unsqueeze(1)


def squared_norms(x: Tensor) -> Tensor:
    """|x_i|^2 [B, N]. `vecdot` exports as a Mul and a ReduceSum, where an einsum's ONNX Einsum took ONNX Runtime
    eight times as long at batch 1 (benchmarks/pool_layer_ops_onnx.py); `vitpool.flops` counts it, N*C MACs."""
    return torch.linalg.vecdot(x, x)


def squared_distances(x: Tensor, x_sq: Tensor, y: Tensor, y_sq: Tensor | None = None) -> Tensor:
    """||x_i - y_j||^2 as [B, N, K], via one matmul (cdist is neither counted by fvcore nor cheaper here); `y_sq`,
    the squared norms of y, where the caller has them."""
    y_sq = squared_norms(y) if y_sq is None else y_sq
    return x_sq.unsqueeze(-1) - 2 * (x @ y.transpose(1, 2)) + y_sq.unsqueeze(1)


def nearest(x: Tensor, x_sq: Tensor, centers: Tensor) -> Tensor:
    return squared_distances(x, x_sq, centers).argmin(dim=-1)


def cluster_sums(x: Tensor, weight: Tensor, assign: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Weighted sums [B, K, C] and total weights [B, K] of the clusters of `assign` [B, N] (-1: in none):
    N*C multiply-adds, where a matmul with the one-hot assignment spends N*K*C, nearly all of them on zeros."""
    index, weight = _members(assign, weight)
    return member_sums(x, weight, index, k)


def member_sums(x: Tensor, weight: Tensor, assign: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`cluster_sums` where every token is in a cluster (`assign` has no -1): no mask to build."""
    return row_sums(x * weight.unsqueeze(-1), assign, k), row_sums(weight, assign, k)


def row_sums(values: Tensor, index: Tensor, k: int) -> Tensor:
    """out[b, j] = the sum of values[b, i] over the i with index[b, i] = j: [B, N] or [B, N, C] -> [B, K] or [B, K, C].

    In PyTorch, one `index_add` of whole rows over the flattened batch, 2-3x faster than `scatter_add`. Exported,
    never a ScatterND with reduction add (what `index_add` exports as): ONNX Runtime 1.32 runs it on several threads
    with a race between repeated indices, losing adds at random. Rows of features take running sums in cluster order
    instead (`sorted_row_sums`); single values take a `scatter_add` (ONNX ScatterElements, race-free). The adds
    into one row run in token order on the CPU; on CUDA in any order (last-bit differences) unless
    torch.use_deterministic_algorithms.
    """
    batch, n = index.shape
    tail = values.shape[2:]
    if exporting():
        if tail:
            return sorted_row_sums(values, index, k)
        return values.new_zeros(batch, k).scatter_add(1, index, values)
    flat = (index + batch_offsets(batch, k, index.device)).reshape(batch * n)
    rows = values.new_zeros(batch * k, *tail).index_add(0, flat, values.reshape(batch * n, *tail))
    return rows.view(batch, k, *tail)


def sorted_row_sums(values: Tensor, index: Tensor, k: int) -> Tensor:
    """`row_sums` of rows [B, N, C] as differences of a running sum over the rows sorted by cluster: a TopK, three
    Gathers, a CumSum and a Sub in ONNX, where ONNX Runtime runs a ScatterElements one element at a time
    (benchmarks/pool_layer_ops_onnx.py). N*C adds, as before.
    """
    n = index.shape[1]
    order = index.topk(n, dim=1, largest=False).indices  # the tokens grouped by cluster
    running = F.pad(gather_tokens(values, order).cumsum(1), (0, 0, 1, 0))  # [B, N + 1, C]: a row of zeros first
    count = row_sums(torch.ones_like(index, dtype=values.dtype), index, k).long()  # [B, K]
    end = count.cumsum(1)  # cluster j's rows are the sorted rows end[j] - count[j] to end[j] - 1
    return gather_tokens(running, end) - gather_tokens(running, end - count)


def _members(assign: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Scatter indices for `assign` and the weights with dropped tokens (-1) zeroed."""
    return assign.clamp_min(0), zero_unless(assign >= 0, weight)


def float_weights(weight: Tensor | None, x: Tensor) -> Tensor:
    """Each token's weight [B, N] in float32: `weight`, or 1 for every token of x [B, N, C] where it is None."""
    return torch.ones_like(x[..., 0], dtype=torch.float32) if weight is None else weight.float()


def cluster_means(x: Tensor, weight: Tensor, assign: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Weighted cluster means [B, K, C] (0 where a cluster has no weight) and the clusters' weights [B, K]."""
    sums, mass = cluster_sums(x, weight, assign, k)
    return sums / mass.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1), mass


def reconstruction_error(x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """The objective Token Pooling minimises: sum_i w_i min_j ||x_i - y_j||^2, one value per batch item."""
    x, y = x.float(), y.float()
    d = squared_distances(x, squared_norms(x), y).amin(dim=-1).clamp_min(0)
    return (d if weight is None else d * weight.float()).sum(-1)


def top_k_indices(scores: Tensor, k: int) -> Tensor:
    """The k highest-scoring token indices, in token order (so outputs keep the spatial order)."""
    return in_token_order(scores.topk(k, dim=-1).indices)


def in_token_order(index: Tensor) -> Tensor:
    """Token indices [B, K] sorted: topk of the indices rather than sort, one ONNX TopK where sort adds three
    nodes for its length."""
    return index.topk(index.shape[-1], dim=-1, largest=False).values


def _kmedoids(x: Tensor, k: int, weight: Tensor | None, init_scores: Tensor, iters: int, means: bool = False,
              spread: int = 0, keep_norm: bool = False, positive: bool = False) -> Pooled:
    """Alternate nearest-medoid assignment and per-cluster medoid update, from the seeds (`seed_tokens`); `positive`:
    every weight is above 0.

    Medoids are input tokens, so every distance is read from one pairwise distance matrix built from the
    Gram matrix X X^T (N*N*C MACs, once); an iteration adds only N*N MACs, whatever K and the width C are,
    instead of a dense (N x N)(N x K) update. With no iteration, no such matrix (`_nearest_seeds`).
    """
    xf, w = x.float(), float_weights(weight, x)
    if iters == 0:
        return _nearest_seeds(x, xf, w, k, init_scores, means, spread, keep_norm, positive)
    distance = pairwise_squared_distances(xf)
    batch, n = w.shape
    # gather_tokens(distance, index), with its reshape and offsets made once rather than in every iteration
    flat, offset = distance.reshape(batch * n, n), batch_offsets(batch, n, x.device)
    # More than any cluster's cost (the sum of all weights times the largest distance), with room for rounding.
    weight_row = w.unsqueeze(1)
    above_any_cost = 2 * distance.amax(dim=(1, 2), keepdim=True) * weight_row.sum(-1, keepdim=True) + 1  # [B, 1, 1]

    def medoids_of(index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rows = F.embedding(index + offset, flat)  # [B, K, N]: each medoid's distances, a row of D as D is symmetric
        return index, rows, first_argmin(rows, 1, keepdim=True)  # assign: [B, 1, N]

    def step(index: Tensor, rows: Tensor, assign: Tensor) -> tuple[Tensor, ...]:
        # reads `flat`, not its view `distance`: a torch.cond branch may not close over two views of one tensor
        updated = _update_medoids(flat.view(-1, n, n), weight_row, assign, rows, above_any_cost)
        return *medoids_of(updated), (updated != index).any()

    index, rows, assign = iterate(step, medoids_of(seeds_in_token_order(xf, None, init_scores, k, spread)), iters)
    assign = assign.squeeze(1)
    return _outputs(x, xf, w, index, assign, means, keep_norm)


class Seeds(NamedTuple):
    seeds: Tensor  # [B, K]: the K - s most significant tokens in order of significance, then the s spread seeds
    ranked: Tensor  # [B, N]: every token in order of significance; the tokens after the first K - s are the rest
    picked: Tensor | None  # [B, s]: the spread seeds' places in the rest (s > 0)
    rest: tuple[Tensor, Tensor] | None  # the rest's tokens [B, N - K + s, C] and squared norms (s > 0)
    to_first: Tensor | None  # [B, N - K + s, K - s]: the rest's squared distances to the first K - s seeds (s > 0)


def seed_tokens(xf: Tensor, x_sq: Tensor | None, scores: Tensor, k: int, spread: int) -> Seeds:
    """Where clustering starts: the k most significant tokens (the paper's top-K initialisation), or with `spread`
    s > 0 the k - s most significant and then the s tokens of largest significance times distance to the nearest
    of those: the attended tokens that the first seeds represent worst. So a distinct region gets a seed of its own
    where top-K would spend it on a second token of a region already seeded. (Times the squared distance, the
    reconstruction error's terms, far tokens of little attention won more seeds and CLIP's embeddings moved more
    at a budget of 0.5: benchmarks/README.md.) `to_first` serves the assignment after no iteration, which then
    costs s*k*C MACs more than from top-K seeds. `x_sq`, the squared norms, is computed here if None and needed."""
    n = scores.shape[1]
    ranked = scores.topk(n, dim=-1)
    s = min(spread, k // 2)  # significance stays the main criterion
    first, rest_index = ranked.indices[:, : k - s], ranked.indices[:, k - s :]
    if s == 0:
        return Seeds(first, ranked.indices, None, None, None)
    x_sq = squared_norms(xf) if x_sq is None else x_sq
    rest = rows(xf, x_sq, rest_index)
    to_first = squared_distances(*rest, *rows(xf, x_sq, first))
    error = ranked.values[:, k - s :].float() * to_first.amin(-1).clamp_min(0).sqrt()
    picked = error.topk(s, dim=-1).indices
    seeds = torch.cat([first, rest_index.gather(1, picked)], 1)
    return Seeds(seeds, ranked.indices, picked, rest, to_first)


def rows(xf: Tensor, x_sq: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The tokens [B, K, C] at `index` [B, K] and their squared norms [B, K]."""
    return gather_tokens(xf, index), x_sq.gather(1, index)


def seeds_in_token_order(xf: Tensor, x_sq: Tensor | None, scores: Tensor, k: int, spread: int) -> Tensor:
    """The seeds [B, K] of `seed_tokens` in token order, where clustering iterations start."""
    return in_token_order(seed_tokens(xf, x_sq, scores, k, spread).seeds)


def _nearest_seeds(x: Tensor, xf: Tensor, w: Tensor, k: int, init_scores: Tensor, means: bool, spread: int,
                   keep_norm: bool = False, positive: bool = False) -> Pooled:
    """K-Medoids with no iteration: the seeds (`seed_tokens`) are the medoids and every other token joins the
    nearest (ties to the seed `seed_tokens` lists first: of two top-K seeds, the more significant). Only the
    distances from the N - k others (with spread seeds, N - k + s) to the k seeds are needed, (N - k)*k*C MACs
    where the iterations' pairwise matrix costs N*N*C: at K near N, a tenth. Every seed is its own cluster's
    member, even beside an exact duplicate seed, so with `positive` weights no cluster is without weight. The
    outputs are in token order, as the input tokens were: K = N changes nothing. Written for few ONNX nodes,
    which is what a layer costs ONNX Runtime at batch 1 (benchmarks/pool_layer_ops_onnx.py): the work stays in
    order of significance, as `seed_tokens` leaves it, and only the assignment returns to token order, by one
    scatter.
    """
    x_sq = squared_norms(xf)
    check_finite(x_sq)  # a NaN or inf anywhere in a token shows in its squared norm
    seeds, ranked, picked, rest, to_first = seed_tokens(xf, x_sq, init_scores, k, spread)
    s = 0 if picked is None else picked.shape[1]
    if s:  # the distances to the spread seeds, which are among the rest
        distance = torch.cat([to_first, squared_distances(*rest, *rows(xf, x_sq, seeds[:, k - s :]))], -1)
    else:
        distance = squared_distances(*rows(xf, x_sq, ranked[:, k:]), *rows(xf, x_sq, seeds))
    nearest_seed = first_argmin(distance, -1)  # [B, N - k + s]: a column of `seeds`
    if s:  # each spread seed in its own cluster, though it is among the rest
        nearest_seed = nearest_seed.scatter(1, picked, torch.arange(k - s, k, device=x.device).expand(picked.shape))
    by_token = seeds.topk(k, dim=-1, largest=False)  # the outputs: the seeds in token order
    output_of = by_token.indices.topk(k, dim=-1, largest=False).indices  # each seed's output (inverse permutation)
    in_ranked_order = torch.cat([output_of[:, : k - s], output_of.gather(1, nearest_seed)], 1)
    assign = ranked.scatter(1, ranked, in_ranked_order)  # every place written: `ranked` is a permutation
    return _outputs(x, xf, w, by_token.values, assign, means, keep_norm, x_sq, positive)


def _outputs(x: Tensor, xf: Tensor, w: Tensor, medoid_index: Tensor, assign: Tensor, means: bool,
             keep_norm: bool = False, x_sq: Tensor | None = None, positive: bool = False) -> Pooled:
    """The medoids, or with `means` the clusters' weighted means (N*C more MACs), with `keep_norm` at their members'
    norm (`norm_kept`, reading the tokens' squared norms `x_sq` where the clustering made them). A cluster without
    weight (its medoid went to an exact duplicate medoid of a lower index, or every member has weight 0) keeps its
    medoid, as in K-Means, rather than a mean of nothing: a token of zeros. With `positive` weights, every cluster
    has weight (`_nearest_seeds`), and the medoids are not read."""
    if not means:
        return Pooled(gather_tokens(x, medoid_index), assign)
    k = medoid_index.shape[1]
    sums, mass = member_sums(xf, w, assign, k)
    if keep_norm:
        means = norm_kept(sums, mass, w, assign, squared_norms(xf) if x_sq is None else x_sq)
    else:
        means = sums / mass.clamp_min(torch.finfo(xf.dtype).tiny).unsqueeze(-1)
    if positive:
        return Pooled(means.to(x.dtype), assign)
    return Pooled(torch.where((mass > 0).unsqueeze(-1), means.to(x.dtype), gather_tokens(x, medoid_index)), assign)


def norm_kept(sums: Tensor, mass: Tensor, w: Tensor, assign: Tensor, x_sq: Tensor) -> Tensor:
    """Cluster means [B, K, C] at their members' weighted mean norm, from the clusters' weighted sums [B, K, C] and
    weights [B, K] (written from the observation behind MLERP merging, Kim et al., "Token Fusion", WACV 2024:
    averaging shrinks tokens). A mean of tokens that point different ways is shorter than they are, the more so
    the looser its cluster. In a pre-norm ViT the LayerNorms read direction only, but every later block adds its
    output to the token itself: a shortened token is moved further by each of them than its members would have
    been. The mean's direction is the sum's, so the sums are rescaled directly. K*C + N MACs more, given the
    tokens' squared norms `x_sq`; `assign` has no -1.
    """
    tiny = torch.finfo(sums.dtype).tiny
    target = row_sums(x_sq.sqrt() * w, assign, sums.shape[1]) / mass.clamp_min(tiny)
    return sums * (target / squared_norms(sums).sqrt().clamp_min(tiny)).unsqueeze(-1)


def pairwise_squared_distances(x: Tensor) -> Tensor:
    """||x_i - x_j||^2 as [B, N, N], from the Gram matrix X X^T (N*N*C MACs)."""
    return distances_from_gram(x @ x.transpose(1, 2))


def distances_from_gram(gram: Tensor) -> Tensor:
    """Squared distances [B, N, N] from a Gram matrix, exactly symmetric with an exact zero diagonal even where
    a kernel's Gram matrix is not exactly symmetric.

    Exact symmetry matters: two tokens alone in a cluster are equally good medoids, and only a tie that is
    exact in floating point resolves the same way (first index) in PyTorch and in ONNX Runtime.
    """
    n = gram.shape[1]
    # The diagonal as a strided slice of the flattened Gram matrix: exact, and two ONNX nodes where
    # torch.diagonal exports as sixteen.
    sq = gram.flatten(1)[:, :: n + 1]
    check_finite(sq)  # a NaN or inf anywhere in a token shows in its squared norm: B*N values to check, not B*N*C
    # D = E + E^T with E_ij = |x_j|^2 - G_ij: a sum of two addends is the same either way round, and E_ii is
    # exactly 0. Two N x N operations fewer than (|x_i|^2 + |x_j|^2) - (G + G^T), which is exact too.
    half = sq.unsqueeze(1) - gram
    return (half + half.transpose(1, 2)).clamp_min(0)


def first_argmin(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """argmin, ties to the first index; eager `min(dim)` is 2-4x faster than `argmin` on the CPU, and
    exports as an extra ReduceMin, so the exported graph gets a plain ArgMin (same ties)."""
    return x.argmin(dim, keepdim=keepdim) if is_tracing() else x.min(dim, keepdim=keepdim).indices


def zero_unless(keep: Tensor, x: Tensor) -> Tensor:
    """x where `keep`, else 0; the same values either way: `where` is faster in eager PyTorch, while ONNX
    Runtime runs Where with a scalar 3x slower than a Cast and a Mul (x is finite, so x * 0 is 0)."""
    return x * keep.to(x.dtype) if is_tracing() else torch.where(keep, x, 0.0)


def where_member(member: Tensor, cost: Tensor, above: Tensor) -> Tensor:
    """`where(member, cost, above)` for 0 <= cost < above. ONNX Runtime's broadcasting Where is 2x slower
    than Max(cost, above * not member), which gives the same values and is what exports."""
    return torch.maximum(cost, zero_unless(~member, above)) if is_tracing() else torch.where(member, cost, above)


def _update_medoids(distance: Tensor, weight_row: Tensor, assign: Tensor, rows: Tensor, above_any_cost: Tensor) -> Tensor:
    """Each cluster's member j minimising sum_i w_i ||x_i - x_j||^2 over its members i; ties to the first.

    `assign` is [B, 1, N]. The cost is a masked N x N matrix-vector product (the mask is symmetric, so
    w^T (D * mask) gives it as a row). A token outside the cluster costs more than any member, plus its
    distance to the cluster's medoid (`rows`), so an empty cluster keeps its medoid (or an exact duplicate).
    """
    k = rows.shape[1]
    # [B, N, 1] as a view: it exports as a Reshape, which ONNX Runtime runs in place (a Transpose copies)
    column = assign.view(assign.shape[0], -1, 1)
    cost = weight_row @ zero_unless(column == assign, distance)  # [B, 1, N]
    member = torch.arange(k, device=assign.device).view(1, k, 1) == assign  # [B, K, N]
    return first_argmin(where_member(member, cost, above_any_cost + rows), 2)


def _kmeans(x: Tensor, k: int, weight: Tensor | None, init_scores: Tensor, iters: int, spread: int = 0) -> Pooled:
    """Alternate nearest-centre assignment and (weighted) mean update, from the seeds (`seed_tokens`)."""
    xf, w = x.float(), float_weights(weight, x)
    x_sq = squared_norms(xf)
    check_finite(x_sq)
    centers = gather_tokens(xf, seeds_in_token_order(xf, x_sq, init_scores, k, spread))
    assign = nearest(xf, x_sq, centers)

    def recentred(centers: Tensor, assign: Tensor) -> Tensor:
        means, mass = cluster_means(xf, w, assign, k)
        # A cluster with no weight (empty, or all significance 0) keeps its centre rather than collapsing to 0.
        return torch.where((mass > 0).unsqueeze(-1), means, centers)

    def step(centers: Tensor, assign: Tensor) -> tuple[Tensor, ...]:
        centers = recentred(centers, assign)
        updated = nearest(xf, x_sq, centers)
        return centers, updated, (updated != assign).any()  # unchanged: the next means would be these centres

    centers, assign = iterate(step, (centers, assign), iters)
    return Pooled(centers.to(x.dtype), assign)


def _weights(significance: Tensor | None, size: Tensor | None) -> Tensor | None:
    """Each token's weight in the reconstruction error: its significance (weighted methods) times the patches it
    stands for (`size`, when given), or None for all ones."""
    if significance is None or size is None:
        return significance if size is None else size
    return significance * size


def kmedoids(x: Tensor, k: int, significance: Tensor, iters: int = 5, means: bool = False,
             size: Tensor | None = None, spread: int = 0, keep_norm: bool = False) -> Pooled:
    """K-Medoids (outputs are input tokens, or with `means` their clusters' means, with `keep_norm` at their
    members' norm), from the k most significant tokens (`spread` of them chosen for spread instead: `seed_tokens`);
    with `size` (each above 0), a token's error counts as many times as the patches it stands for."""
    return _kmedoids(x, k, _weights(None, size), significance, iters, means, spread, keep_norm, positive=True)


def wkmedoids(x: Tensor, k: int, significance: Tensor, iters: int = 5, means: bool = False,
              size: Tensor | None = None, spread: int = 0, keep_norm: bool = False) -> Pooled:
    """Weighted K-Medoids, the paper's best: each token's error is weighted by its significance (times `size`).

    With `means`, each output is its cluster's weighted mean instead of the medoid (`keep_norm`: as kmedoids).
    """
    return _kmedoids(x, k, _weights(significance, size), significance, iters, means, spread, keep_norm)


def kmeans(x: Tensor, k: int, significance: Tensor, iters: int = 5, size: Tensor | None = None,
           spread: int = 0) -> Pooled:
    """K-Means (outputs are cluster means), initialised with the seeds of `seed_tokens`."""
    return _kmeans(x, k, _weights(None, size), significance, iters, spread)


def wkmeans(x: Tensor, k: int, significance: Tensor, iters: int = 5, size: Tensor | None = None,
            spread: int = 0) -> Pooled:
    """Weighted K-Means: outputs are significance-weighted (times `size`) cluster means."""
    return _kmeans(x, k, _weights(significance, size), significance, iters, spread)


def select(x: Tensor, k: int, scores: Tensor) -> Pooled:
    """Keep the k highest-scoring tokens and drop the rest (importance and random selection)."""
    check_finite(x)
    index = top_k_indices(scores, k)
    picked = index.unsqueeze(-1) == torch.arange(x.shape[1], device=x.device).view(1, 1, -1)  # [B, K, N]
    assign = torch.where(picked.any(1), picked.to(torch.int64).argmax(1), torch.full_like(index[:, :1], -1))
    return Pooled(gather_tokens(x, index), assign)


def importance(x: Tensor, k: int, significance: Tensor) -> Pooled:
    """Importance selection (PoWER-BERT, Goyal et al. 2020): keep the k most significant tokens."""
    return select(x, k, significance)


def grid_assignment(grid_in: tuple[int, int], grid_out: tuple[int, int], device: torch.device) -> Tensor:
    """[N] output cell of each token of a row-major `grid_in` partitioned into `grid_out` blocks."""
    (rows, cols), (out_rows, out_cols) = grid_in, grid_out
    r = torch.arange(rows, device=device) * out_rows // rows
    c = torch.arange(cols, device=device) * out_cols // cols
    return (r.unsqueeze(1) * out_cols + c.unsqueeze(0)).reshape(-1)


def grid(x: Tensor, grid_in: tuple[int, int], grid_out: tuple[int, int]) -> Pooled:
    """Average pooling on the 2-D token grid: each output is the mean of one rectangular block of tokens.

    Blocks partition the grid (sizes differ by at most one row or column when the grid does not divide),
    unlike adaptive average pooling, whose windows overlap there and which ONNX cannot export in general.
    """
    check_finite(x)
    assign = grid_assignment(grid_in, grid_out, x.device).unsqueeze(0).expand(x.shape[0], -1)
    k = grid_out[0] * grid_out[1]
    means, _ = cluster_means(x.float(), float_weights(None, x), assign, k)
    return Pooled(means.to(x.dtype), assign)


def tome(x: Tensor, k: int, metric: Tensor | None = None, size: Tensor | None = None, offset: int = 0) -> Pooled:
    """ToMe's bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

    Re-implemented from the paper. Tokens alternate into sets A and B by their place in the whole sequence
    (`offset`: the prefix tokens in front of `x`, which ToMe's alternation counts though it never merges them);
    each A token's most similar B token (cosine similarity of `metric`; ToMe uses the attention keys averaged
    over heads) is an edge, and the r = N - k strongest edges merge their A token into its B token by a
    size-weighted mean. The outputs are in ToMe's order: the unmerged A tokens as they came, then the B tokens
    (the order decides the next layer's sets). Removes at most half of the tokens; K = N changes nothing.
    """
    check_finite(x)
    batch, n, _ = x.shape
    r = n - k
    if r < 0 or r > n // 2:
        raise ValueError(f"tome keeps between {n - n // 2} and {n} of {n} tokens; asked for {k}")
    if r == 0:
        return Pooled(x, torch.arange(n, device=x.device).expand(batch, -1))
    metric = (x if metric is None else metric).float()
    metric = metric / squared_norms(metric).sqrt().clamp_min(1e-12).unsqueeze(-1)
    first_a = offset % 2
    a, b = metric[:, first_a::2], metric[:, 1 - first_a :: 2]
    n_a, n_b = a.shape[1], b.shape[1]
    best, best_b = (a @ b.transpose(1, 2)).max(dim=-1)  # [B, Na]
    order = best.topk(n_a, dim=-1).indices  # strongest edge first (ONNX TopK; a stable sort does not export)
    merged = order.topk(n_a, dim=-1, largest=False).indices < r  # the inverse permutation is each A token's rank
    slot = (~merged).long().cumsum(dim=-1) - 1  # an unmerged A token's place among those kept, in token order
    assign_a = torch.where(merged, (n_a - r) + best_b, slot)
    assign_b = (n_a - r) + torch.arange(n_b, device=x.device).expand(batch, -1)
    # back from [A..., B...] to token order: token i is A's (i // 2)-th if it has A's parity, else B's
    back = torch.tensor([i // 2 + (0 if i % 2 == first_a else n_a) for i in range(n)], device=x.device)
    assign = torch.cat([assign_a, assign_b], dim=1).index_select(1, back)
    merged_tokens, _ = cluster_means(x.float(), float_weights(size, x), assign, k)
    return Pooled(merged_tokens.to(x.dtype), assign)


def merged_sizes(assign: Tensor, size: Tensor, k: int) -> Tensor:
    """How many original patches each output token stands for, given the input tokens' sizes."""
    index, size = _members(assign, size)
    return row_sums(size, index, k)


def merged_positions(positions: Tensor, assign: Tensor, size: Tensor, merged: Tensor) -> Tensor:
    """Each output token's rotary embedding [L, B, H, K, D]: the mean over the original patches it stands for,
    from the input tokens' [L, B or 1, H, N, D], their sizes [B, N] and the output sizes `merged` [B, K]."""
    index, weight = _members(assign, size)
    layers, _, heads, n, width = positions.shape
    batch, k = merged.shape
    shape = (layers, batch, heads, n, width)
    weighted = positions.expand(shape) * weight.view(1, batch, 1, n, 1).to(positions.dtype)
    sums = positions.new_zeros(layers, batch, heads, k, width).scatter_add(3, index.view(1, batch, 1, n, 1).expand(shape), weighted)
    return sums / merged.clamp_min(1).view(1, batch, 1, k, 1).to(positions.dtype)


def merged_pair_bias(bias: Tensor, origin: Tensor, size: Tensor) -> Tensor:
    """An attention bias between every pair of original tokens [1 or B, H, P+N, P+N] for the pooled tokens
    [B, H, P+K, P+K]: each pair gets the mean over the pairs of original tokens the two stand for. `origin`
    [B, N] is each original patch's pooled token (-1: dropped), `size` [B, K] how many patches each stands for;
    prefix tokens stand for themselves. Two scatter-adds (rows, then columns): no N x K matrix is multiplied."""
    batch, k = size.shape
    heads, total = bias.shape[1], bias.shape[-1]
    prefix = total - origin.shape[1]
    index, weight = _members(origin, torch.ones_like(origin, dtype=bias.dtype))
    ones = bias.new_ones(batch, prefix)
    index = torch.cat([torch.arange(prefix, device=origin.device).expand(batch, prefix), index + prefix], dim=1)
    weight = torch.cat([ones, weight], dim=1)
    rows = bias.new_zeros(batch, heads, prefix + k, total).scatter_add(
        2, index[:, None, :, None].expand(batch, heads, total, total), bias.expand(batch, heads, total, total) * weight[:, None, :, None])
    pairs = bias.new_zeros(batch, heads, prefix + k, prefix + k).scatter_add(
        3, index[:, None, None, :].expand(batch, heads, prefix + k, total), rows * weight[:, None, None, :])
    counts = torch.cat([ones, size.to(bias.dtype)], dim=1).clamp_min(1)
    return pairs / (counts[:, None, :, None] * counts[:, None, None, :])
