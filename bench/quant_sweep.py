"""Bench: how many blocks can move to a lower bit width before perplexity rises by more than 5 %?

    .venv/bin/python bench/quant_sweep.py                  # 4 -> 3 bits, group 64

Every block starts at the high scheme (4-bit, group 64, round to nearest); 0 %, 10 %, ... 100 % of
the blocks move to the low scheme (3-bit, group 64) in the order each metric gives (least important
first: quant_sensitivity measured at 3 bits, and cheap one-pass metrics) and in random orders
(3 seeds). Each grid point: held-out Wikipedia perplexity with the fake-quant model (bit-exact
with HQQ's dequantized weights), full evaluation, no prefix reuse. Printed: the perplexity table
and each ordering's tolerated share (largest share within +5 % of the all-high reference, every
smaller share included). An ordering stops at its first point above the limit.

SmolLM2's weights were already rounded to 4 bits (Q4_1, blocks of 32): the schemes here (group 64
with float16 scale/zero, 3-bit) lie off that grid, and the unquantized baseline is the dequantized
fp32 model.

Environment: LAYERSCOPE_BENCH_EVAL_TOKENS (16384), LAYERSCOPE_BENCH_CALIB_TOKENS (2048),
LAYERSCOPE_BENCH_HIGH ("4,64"), LAYERSCOPE_BENCH_LOW ("3,64"), LAYERSCOPE_BENCH_SEEDS ("0,1,2"),
LAYERSCOPE_BENCH_ORDERINGS (metric columns; default quant_sensitivity + 3 cheap metrics, among them
zd_outlier_share, the one whose ranking agrees best with quant_sensitivity on SmolLM2),
LAYERSCOPE_BENCH_GRID_STEPS (10: steps of 10 %; 30: one block at a time on SmolLM2),
LAYERSCOPE_BENCH_FULL=1 to evaluate every grid point (no early stop).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quant_common import OUT, load_scores, log, wait_for_assets  # noqa: E402

DEFAULT_ORDERINGS = "quant_sensitivity,zd_outlier_share,block_influence,angular_distance_n1"


def main() -> None:
    from layerscope.evaluation.perplexity import PerplexityProtocol
    from layerscope.model.loading import load_model
    from layerscope.compress.quant import Scheme
    from layerscope.evaluation.quant_sweep import (
        PRE_ROUNDED_NOTE,
        Evaluator,
        attach,
        random_orderings,
        run_sweep,
        sweep_table_text,
    )

    eval_tokens = int(os.environ.get("LAYERSCOPE_BENCH_EVAL_TOKENS", 16384))
    calib_tokens = int(os.environ.get("LAYERSCOPE_BENCH_CALIB_TOKENS", 2048))
    hb, hg = (int(x) for x in os.environ.get("LAYERSCOPE_BENCH_HIGH", "4,64").split(","))
    lb, lg = (int(x) for x in os.environ.get("LAYERSCOPE_BENCH_LOW", "3,64").split(","))
    seeds = [int(x) for x in os.environ.get("LAYERSCOPE_BENCH_SEEDS", "0,1,2").split(",")]
    names = [x for x in os.environ.get("LAYERSCOPE_BENCH_ORDERINGS", DEFAULT_ORDERINGS).split(",") if x]
    full = os.environ.get("LAYERSCOPE_BENCH_FULL") == "1"
    steps = int(os.environ.get("LAYERSCOPE_BENCH_GRID_STEPS", 10))  # 10: 0 %, 10 %, ...; 30: one block at a time
    grid = [k / steps for k in range(steps + 1)]
    high, low = Scheme(hb, hg), Scheme(lb, lg)

    wait_for_assets()
    lm = load_model(None)
    from layerscope.model.adapter import find_parts

    L = find_parts(lm.model).num_layers
    proto = PerplexityProtocol(max_tokens=eval_tokens)
    ev = Evaluator(lm.model, lm.tokenizer, proto)
    # random orderings first: they need no scores (the score table may still be being measured)
    rnd = random_orderings(L, seeds)
    log(f"sweep {high.label} -> {low.label}, {len(rnd)} random orderings, {proto.describe()}")
    res_r = run_sweep(ev, rnd, high, low, grid=grid, early_stop=not full, model_id=lm.model_id, log=log)
    table = load_scores(lm, calib_tokens, (2, 3, 4), 64, "rtn")
    orderings = {}
    for n in names:
        if n == "quant_sensitivity" and lb in (2, 3, 4) and lg == 64:
            from layerscope.metrics.ground_truth.quant_sensitivity import kl_from_details

            kl = kl_from_details(table.column("quant_sensitivity").details)[Scheme(lb, lg)]
            orderings[f"quant_sensitivity@{lb}b"] = sorted(range(L), key=lambda i: (kl[i], i))
        else:
            orderings[n] = table.ranking(n)
    log(f"sweep {high.label} -> {low.label}, {len(orderings)} metric orderings")
    res = run_sweep(ev, orderings, high, low, grid=grid, early_stop=not full, model_id=lm.model_id, log=log)
    res.rows += res_r.rows  # (the unquantized and all-high evaluations are shared: memoised)
    res.tolerated_share.update(res_r.tolerated_share)
    res.orderings.update(res_r.orderings)
    res.wall_time_s = (res.wall_time_s or 0) + (res_r.wall_time_s or 0)
    res.notes.append(PRE_ROUNDED_NOTE)

    print()
    print(f"Sweep on SmolLM2-135M-Instruct: blocks moved from {high.label} to {low.label} (RTN, HQQ fake-quant), "
          f"least important first")
    print(f"  held-out perplexity, {proto.describe()}")
    print(f"  unquantized (dequantized Q4_1 fp32) {res.baseline_perplexity:.4f}; all {high.label} "
          f"{res.reference_perplexity:.4f}; limit +{res.threshold:.0%} = "
          f"{res.reference_perplexity * (1 + res.threshold):.4f}")
    print(f"  {PRE_ROUNDED_NOTE}")
    print("  '·' = not evaluated (the ordering had already crossed the limit)")
    print()
    print(sweep_table_text(res))
    print(f"\n  {ev.evaluations} evaluations, {ev.seconds:.0f} s evaluating, {res.wall_time_s:.0f} s sweep")

    OUT.mkdir(parents=True, exist_ok=True)
    tag = f"{high.bits}to{low.bits}_g{low.group_size}"
    (OUT / f"quant_sweep_{tag}.json").write_text(json.dumps(res.model_dump(mode="json"), indent=2))
    attach(table, sweep=res)
    try:
        from layerscope.report import render_report

        (OUT / f"quant_sweep_{tag}_report.html").write_text(render_report(table), encoding="utf-8")
    except Exception as exc:
        log(f"report not written: {exc}")
    log(f"wrote {OUT / f'quant_sweep_{tag}.json'}")


if __name__ == "__main__":
    main()
