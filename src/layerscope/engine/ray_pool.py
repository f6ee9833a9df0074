"""Fan independent work out over a Ray cluster (the optional `layerscope[ray]` extra).

`WorkerPool(payload, address)` puts `payload` (e.g. the model and the evaluation tokens) into the
object store once; `pool.map(fn, items)` runs ``fn(payload, item)`` for every item as a Ray task
on whichever worker is free and returns the results in the order of `items`. `fn`
must be a module-level function (it is shipped by reference). Every worker computes with the same
number of torch threads as the caller, so the numbers are the ones a local run gives.

address: "local" (or None) starts a local cluster on this machine (`num_cpus` workers);
anything else is passed to ``ray.init(address=...)`` (e.g. "auto" or "ray://head:10001").
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from layerscope.errors import LayerscopeError

LOCAL = "local"


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LayerscopeError("--ray needs Ray: pip install 'layerscope[ray]'") from None
    return ray


def connect(address: str | None = LOCAL, num_cpus: int | None = None) -> Any:
    """ray.init once (a local cluster for "local"/None, else the given address); returns the ray module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address in (None, "", LOCAL):
        kwargs["num_cpus"] = num_cpus or max(1, min(os.cpu_count() or 1, 2))
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LayerscopeError(f"could not start or reach the Ray cluster ({address}): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return ray


_PAYLOAD: dict[str, Any] = {}  # per worker process: the last payload, deserialised once


def _run(box: list, threads: int, fn: Callable[[Any, Any], Any], item: Any) -> Any:
    import torch

    ray = require_ray()
    ref = box[0]  # boxed so Ray does not resolve it per task: a warm worker reuses its copy
    if ref.hex() not in _PAYLOAD:
        _PAYLOAD.clear()
        _PAYLOAD[ref.hex()] = ray.get(ref)
    torch.set_num_threads(threads)
    with torch.no_grad():
        return fn(_PAYLOAD[ref.hex()], item)


class WorkerPool:
    """Ray tasks over `payload`; `map(fn, items)` returns the results in the order of `items`.

    The payload is put into the object store once; each worker process deserialises it on its
    first task and keeps it for the next ones (Ray reuses warm worker processes)."""

    def __init__(self, payload: Any, address: str | None = LOCAL, workers: int | None = None):
        import torch

        ray = connect(address, num_cpus=workers)
        self.ray = ray
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.box = [ray.put(payload)]
        self.threads = torch.get_num_threads()
        self.task = ray.remote(num_cpus=1)(_run)

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any]) -> list[Any]:
        refs = [self.task.remote(self.box, self.threads, fn, it) for it in items]
        return list(self.ray.get(refs))

    def map_dealt(self, fn: Callable[[Any, list[int]], list[Any]], n: int) -> list[Any]:
        """The results for indices 0..n-1 (e.g. blocks), dealt out round-robin, one chunk per worker:
        ``fn(payload, chunk)`` returns one result per index of its chunk; they come back in index order.
        Dealing (not slicing) balances the load when later indices cost more or less than earlier ones."""
        k = max(1, min(self.workers, n))
        chunks = [list(range(w, n, k)) for w in range(k)]
        out: list[Any] = [None] * n
        for chunk, got in zip(chunks, self.map(fn, chunks)):
            for i, r in zip(chunk, got):
                out[i] = r
        return out

    def close(self) -> None:
        self.box = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def task_runner(payload: Any, fn: Callable[[Any, Any], Any], address: str | None
                ) -> Iterator[Callable[[Sequence[Any]], list[Any]]]:
    """`run(items)` giving ``[fn(payload, item) for item in items]``: one after the other here (no `address`),
    or as Ray tasks on `address` ("local" for a local cluster). Both call `fn` on the same inputs, so a verb
    written against `run` gives the same numbers with and without --ray."""
    if not address:
        yield lambda items: [fn(payload, it) for it in items]
        return
    with WorkerPool(payload, address) as pool:
        yield lambda items: pool.map(fn, list(items))
