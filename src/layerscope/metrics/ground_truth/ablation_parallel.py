"""Leave-one-out ablation fanned out over Ray workers (`--ray`): the same numbers as the local run.

The ablated layers are dealt out round-robin (layer i costs L-1-i block evaluations, so dealing
balances the load); every worker captures the same batches, runs the same prefix-reuse ablation
(`ablation.leave_one_out`) on its layers, and the driver takes each layer's sums from the worker
that computed it. Sums over batches are added in the same order as locally, so the result is
bit-identical to `leave_one_out` on one machine. Each worker repeats the one reference pass (full
model over the batches); the evaluation counts report the local algorithm's.
"""
from __future__ import annotations

from typing import Any, Sequence

from layerscope.metrics.ground_truth.ablation import UNITS, AblationResult, leave_one_out


def _task(payload: tuple, layers: list[int]) -> AblationResult:
    from layerscope.engine.runner import BlockRunner
    from layerscope.model.adapter import find_parts

    model, inputs, eager, units = payload
    runner = BlockRunner(find_parts(model), inputs, eager_batches=eager)
    runner.capture()
    return leave_one_out(runner, units, layers)


def leave_one_out_ray(runner: Any, units: Sequence[str] = UNITS, address: str | None = "local",
                      workers: int | None = None) -> AblationResult:
    """`leave_one_out(runner, units)` computed by Ray workers (see the module docstring)."""
    from layerscope.engine.ray_pool import WorkerPool

    L = runner.parts.num_layers
    units = tuple(u for u in UNITS if u in set(units))
    eager = sum(1 for b in runner.batches if b.eager)
    payload = (runner.model, [b.inputs for b in runner.batches], eager, units)
    with WorkerPool(payload, address, workers) as pool:
        n = min(pool.workers, L)
        chunks = [list(range(w, L, n)) for w in range(n)]
        parts = pool.map(_task, chunks)
    res = AblationResult(num_layers=L, units=units, base_nll_sum=parts[0].base_nll_sum, positions=parts[0].positions)
    for chunk, r in zip(chunks, parts):
        for u in units:
            for i in chunk:
                res.kl_sum[u][i] = r.kl_sum[u][i]
                res.nll_sum[u][i] = r.nll_sum[u][i]
        res.block_evaluations += r.block_evaluations
        res.naive_block_evaluations += r.naive_block_evaluations
        res.head_evaluations += r.head_evaluations
        res.wall_time_s = max(res.wall_time_s, r.wall_time_s)
    # Counts describe the algorithm as run locally: the reference pass every worker repeats is counted once.
    b = len(runner.batches)
    res.block_evaluations -= (n - 1) * b * L
    res.naive_block_evaluations -= (n - 1) * b * L
    res.head_evaluations -= (n - 1) * b
    return res
