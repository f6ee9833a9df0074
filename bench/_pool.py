"""Evaluate bench rows in forked workers that share the parent's statistics (copy-on-write).

On the shared 2-core machine one process gets a small slice of the CPU; rows are independent once
the statistics pass is done, so they run in `workers` forked children, in submission order
(priority first), and the parent prints each row as it arrives.
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable, Iterable, Iterator

_JOB: Callable[[Any], Any] | None = None


def _call(spec):
    import torch

    torch.set_num_threads(1)
    return spec, _JOB(spec)


def run_rows(job: Callable[[Any], Any], specs: Iterable[Any], workers: int) -> Iterator[tuple[Any, Any]]:
    global _JOB
    _JOB = job
    specs = list(specs)
    if workers <= 1:
        for s in specs:
            yield _call(s)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap_unordered(_call, specs, chunksize=1)
