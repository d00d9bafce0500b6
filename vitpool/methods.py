"""The pooling methods: one entry each, read by the configuration, the adapter, the budget solver, the MAC
counter and the command line. The algorithms themselves are tensor functions in `vitpool.pooling`; adding a
method is one entry here, its function there and its call in `adapter.TokenPool.pool`.

Kept free of torch, like `vitpool.config`, so that the command line checks flags before importing anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION, KEYS = "attention", "keys"  # what a method reads from its block while the block runs


@dataclass(frozen=True)
class Method:
    """What vitpool needs to know of a method besides its function."""

    name: str
    about: str  # one line for --help and the docs
    reads: str | None = None  # ATTENTION: significance, from the attention probabilities (the block's explicit
    # attention path); KEYS: ToMe's metric, the attention keys (fused attention kept); None: nothing
    clusters: bool = False  # iterates (--iters) from seeds (--spread) chosen by significance
    medoids: bool = False  # outputs may be the medoids or the clusters' means (--output)
    fixed_layout: bool = False  # its order or grid is drawn at conversion: K cannot follow the input size
    removes_at_most_half: bool = False  # per layer (ToMe's bipartite matching)
    drops: bool = False  # some tokens join no output (selection); the others' every token joins one
    on_grid: bool = False  # K must be a*b on the token grid
    merges_by_size: bool = False  # tracks how many patches each token stands for even without --proportional
    cubic_macs: bool = True  # a layer's MACs are a cubic in (N, K), which budget.MacModel fits (checked) from ten
    # counts instead of tracing every (N, K); not so where the counts follow N's parity (tome) or the grid's shape


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("wkmedoids", "K-Medoids weighted by significance (the attention a token receives): the paper's best",
           ATTENTION, clusters=True, medoids=True),
    Method("kmedoids", "K-Medoids: cluster means (default) or medoids as outputs", ATTENTION, clusters=True, medoids=True),
    Method("wkmeans", "weighted K-Means", ATTENTION, clusters=True),
    Method("kmeans", "K-Means", ATTENTION, clusters=True),
    Method("importance", "the K most significant tokens (PoWER-BERT)", ATTENTION, drops=True),
    Method("random", "a fixed random subset per layer, drawn from the seed at conversion", fixed_layout=True,
           drops=True),
    Method("grid", "average pooling on the 2-D token grid", fixed_layout=True, on_grid=True, cubic_macs=False),
    Method("tome", "ToMe as published, re-implemented from its paper: bipartite soft matching on the keys", KEYS,
           removes_at_most_half=True, merges_by_size=True, cubic_macs=False),
)}


def named(*, where) -> tuple[str, ...]:
    """The names of the methods for which `where(method)` holds, in the registry's order."""
    return tuple(name for name, method in METHODS.items() if where(method))


CLUSTERING_METHODS = named(where=lambda m: m.clusters)
MEDOID_METHODS = named(where=lambda m: m.medoids)
NEEDS_ATTENTION = named(where=lambda m: m.reads == ATTENTION)
