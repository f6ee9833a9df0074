"""Shared set-up of the quantization benches: model, held-out stream, cached score table."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("LAYERSCOPE_BENCH_OUT", Path(__file__).resolve().parent / "out"))
CHEAP_METRICS = ["block_influence", "angular_distance", "relative_contribution", "logit_lens", "weights"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def scores_path(tokens: int, bits, group: int, method: str) -> Path:
    return OUT / f"smollm2_scores_qs{''.join(map(str, bits))}_g{group}_{method}_{tokens}tok.json"


def load_scores(lm, tokens: int, bits, group: int, method: str):
    """quant_sensitivity at `bits` + the cheap default metrics, measured once and cached on disk."""
    from layerscope.data.assets import is_ready
    from layerscope.metrics.table import ScoreTable

    p = scores_path(tokens, bits, group, method)
    lock = p.with_suffix(".measuring")
    while not p.is_file() and lock.is_file():  # another bench process is measuring the same table
        log(f"waiting for {p.name} (being measured by another process)")
        time.sleep(60)
    if p.is_file():
        t = ScoreTable.from_json(p)
        if t.provenance.weights_sha256 == lm.weights_sha256:
            log(f"scores from cache {p}")
            return t
    assert is_ready("smollm2")
    log(f"measuring quant_sensitivity at {list(bits)} bits g{group} ({method}) + cheap metrics on {tokens} tokens")
    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    try:
        table = _measure(lm, tokens, bits, group, method)
    finally:
        lock.unlink(missing_ok=True)
    log(f"measured in {time.perf_counter() - t0:.0f} s")
    table.to_json(p)
    return table


def _measure(lm, tokens: int, bits, group: int, method: str):
    from layerscope.metrics.ground_truth.quant_sensitivity import measure_scores

    table = measure_scores(lm.model, lm.tokenizer, bits=bits, group_size=group, method=method, tokens=tokens,
                           extra_metrics=CHEAP_METRICS)
    table.provenance.model_id = lm.model_id
    table.provenance.weights_sha256 = lm.weights_sha256
    return table


def wait_for_assets() -> None:
    from layerscope.data.assets import is_ready

    while not (is_ready("smollm2") and is_ready("wikipedia")):
        log("waiting for the smollm2/wikipedia assets (poll each minute)")
        time.sleep(60)
