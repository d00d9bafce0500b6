"""How the clustering methods' iterations run, apart from what an iteration does (`vitpool.pooling`).

A method gives one `step(*state) -> (*state, changed)`, `changed` a one-element bool tensor, and `run` applies
it at most `iters` times:
- eagerly on the CPU it stops after a step that changed nothing: the steps left would repeat it, so the
  outputs are those of every iteration;
- traced, compiled and exported graphs, and CUDA (where the check would wait for the GPU), run every step,
  so that a graph has no data-dependent control flow;
- graphs exported within `graphs_stop_at_fixed_point()` run each step after the first inside a `torch.cond`
  (an ONNX If) only while the step before changed something.
`every_iteration()` turns the eager stop off and `counting()` records how many steps each call ran, for tests
and benchmarks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

_GRAPHS_STOP = contextvars.ContextVar("vitpool_graphs_stop_at_fixed_point", default=False)
_EAGER_STOPS = contextvars.ContextVar("vitpool_eager_stops_at_fixed_point", default=True)
_COUNTS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("vitpool_iteration_counts", default=None)


def exporting() -> bool:
    return getattr(torch.compiler, "is_exporting", lambda: False)()  # torch >= 2.5


def is_tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting()


@contextlib.contextmanager
def _set(variable: contextvars.ContextVar, value) -> Iterator:
    token = variable.set(value)
    try:
        yield value
    finally:
        variable.reset(token)


def graphs_stop_at_fixed_point(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """While open, exported graphs skip the steps after a fixed point with If nodes: less pooling time in ONNX
    Runtime on the CPU at batch 1 (benchmarks/onnx_stop_deit_tiny.py), none at batch 32, where a batch stops
    only when every image has. Off by default, so that graphs have no data-dependent control flow: ONNX
    Runtime's CUDA graphs do not capture If nodes, and on CUDA each If copies its condition to the host."""
    return _set(_GRAPHS_STOP, enabled)


def every_iteration() -> contextlib.AbstractContextManager[bool]:
    """While open, eager runs do every step too (the outputs are the same; tests compare the two)."""
    return _set(_EAGER_STOPS, False)


def counting() -> contextlib.AbstractContextManager[list[int]]:
    """While open, every eager `run` appends to the list it yields the number of steps it ran."""
    return _set(_COUNTS, [])


def run(step: Callable[..., tuple], state: tuple[Tensor, ...], iters: int) -> tuple[Tensor, ...]:
    """`state = step(*state)[:-1]` at most `iters` times, stopping as the module docstring says."""
    if iters and exporting() and _GRAPHS_STOP.get():
        return _in_graph(step, state, iters)
    done = 0
    while done < iters:
        *state, changed = step(*state)
        done += 1
        if _may_stop(changed) and not bool(changed):
            break
    if not torch.compiler.is_compiling() and (counts := _COUNTS.get()) is not None:  # dynamo cannot read a ContextVar
        counts.append(done)
    return tuple(state)


def _may_stop(changed: Tensor) -> bool:
    return changed.device.type == "cpu" and not is_tracing() and _EAGER_STOPS.get()


def _in_graph(step: Callable[..., tuple], state: tuple[Tensor, ...], iters: int) -> tuple[Tensor, ...]:
    """The first step, then the rest inside one If on its `changed`, nested, so that a graph that stops runs one
    If's other branch, not one per step left. `step` must not return its inputs or their views, and the
    tensors it closes over must not be views of one another (torch.cond's rules)."""
    *state, changed = step(*state)
    if iters == 1:
        return tuple(state)
    return torch.cond(changed, lambda *s: _in_graph(step, s, iters - 1), _unchanged, tuple(state))


def _unchanged(*state: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.clone() for t in state)
