"""Bench: mixed-precision allocation at equal average bpw on SmolLM2, held-out Wikipedia perplexity.

    .venv/bin/python bench/quant_allocation.py            # budgets 3.25 and 3.5 bpw

For each budget (bits counted in HQQ's real storage: codes + float16 scale and zero per group):
  * exact allocation (MILP) by the measured quant_sensitivity (per-block KL at 2/3/4 bits, group 64)
  * exact allocation by the best cheap metric (highest Spearman rank correlation with quant_sensitivity)
  * uniform: the best single option within the budget, and the nearest one above it (marked over budget)
  * llama.cpp's use_more_bits() rule (whole blocks; the most expensive pair of options that fits)
  * random: the exact plan's options shuffled over the blocks (same histogram, same bpw), 3 seeds
Options: bits {2, 3, 4, 8} x group {64, 128}, round to nearest (HQQ optimize=False), fake-quant
bit-exact with HQQ's dequantized weights; evaluation = layerscope.evaluation.perplexity on the
held-out Wikipedia split (16,384 tokens, context 512, disjoint windows), fp32 compute.

SmolLM2's weights were already rounded to 4 bits (Q4_1, blocks of 32) before we got them: the
baseline is that dequantized fp32 model, and 2/3-bit and group-64/128 schemes lie off its grid.

Environment: LAYERSCOPE_BENCH_EVAL_TOKENS (16384), LAYERSCOPE_BENCH_CALIB_TOKENS (2048),
LAYERSCOPE_BENCH_BUDGETS ("3.25,3.5"), LAYERSCOPE_BENCH_SEEDS ("0,1,2").
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quant_common import OUT, load_scores, log, wait_for_assets  # noqa: E402


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    import numpy as np

    from layerscope.evaluation.perplexity import PerplexityProtocol
    from layerscope.model.loading import load_model
    from layerscope.plans import allocate as al
    from layerscope.compress.quant import Scheme
    from layerscope.metrics.ground_truth.quant_sensitivity import kl_from_details
    from layerscope.evaluation.quant_sweep import PRE_ROUNDED_NOTE, Evaluator, attach

    eval_tokens = int(os.environ.get("LAYERSCOPE_BENCH_EVAL_TOKENS", 16384))
    calib_tokens = int(os.environ.get("LAYERSCOPE_BENCH_CALIB_TOKENS", 2048))
    budgets = [float(x) for x in os.environ.get("LAYERSCOPE_BENCH_BUDGETS", "3.25,3.5").split(",")]
    seeds = [int(x) for x in os.environ.get("LAYERSCOPE_BENCH_SEEDS", "0,1,2").split(",")]
    t0 = time.perf_counter()
    wait_for_assets()
    lm = load_model(None)
    from layerscope.model.adapter import find_parts

    parts = find_parts(lm.model)
    L = parts.num_layers
    layers = al.model_layers(parts)
    options = al.parse_options([2, 3, 4, 8], [64, 128])
    common = dict(num_layers=L, blocks_path=parts.blocks_path)
    proto = PerplexityProtocol(max_tokens=eval_tokens)
    ev = Evaluator(lm.model, lm.tokenizer, proto)
    log(f"evaluation: {proto.describe()}")
    base = ev.perplexity(None)
    log(f"unquantized (dequantized Q4_1, fp32): perplexity {base:.4f}")

    evaluated: dict[tuple[float, str], dict] = {}

    def run(budget: float, name: str, p) -> None:
        t = time.perf_counter()
        ppl = ev.perplexity(p.assignment())
        evaluated[(budget, name)] = {"budget": budget, "name": name, "bpw": p.achieved_bpw, "perplexity": ppl,
                                     "blocks": p.block_labels(), "objective": p.objective}
        log(f"budget {budget:g}: {name:<42s} {p.achieved_bpw:.4f} bpw  ppl {ppl:9.4f}  "
            f"({time.perf_counter() - t:.0f} s)  {' '.join(p.block_labels())}")

    order: dict[float, list[str]] = {b: [] for b in budgets}
    # plans that need no scores first (the score table may still be being measured)
    for budget in budgets:
        for p in al.uniform_for_budget(layers, options, budget, **common):
            tag = "uniform " + Scheme(p.entries[0].bits, p.entries[0].group_size).label
            name = tag + (" (over budget)" if p.achieved_bpw > budget + 1e-12 else "")
            order[budget].append(name)
            run(budget, name, p)
        order[budget].append("llama.cpp rule")
        run(budget, "llama.cpp rule", al.llamacpp_plan(layers, options, budget, **common))

    table = load_scores(lm, calib_tokens, (2, 3, 4), 64, "rtn")
    kl = kl_from_details(table.column("quant_sensitivity").details)
    qs3 = table.values("quant_sensitivity")
    # best cheap metric: rank agreement with the measured sensitivity (both oriented: high = important)
    cheap = {}
    for name, col in table.columns.items():
        if name == "quant_sensitivity" or col.unit != "block" or col.direction is None:
            continue
        v = table.values(name)
        if np.isnan(v).all():
            continue
        cheap[name] = spearman(al.orient(v, col.direction), qs3)
    best = max(cheap, key=cheap.get)
    log("Spearman(metric importance, quant_sensitivity@3b): "
        + ", ".join(f"{k} {v:+.2f}" for k, v in sorted(cheap.items(), key=lambda kv: -kv[1])))
    log(f"best cheap metric: {best}")
    weights = {l.name: lm.model.get_submodule(l.name).weight.data for l in layers}
    mse = al.relative_mse_table(layers, options, weights)
    col = table.column(best)
    imp = al.orient(table.values(best), col.direction)
    for budget in budgets:
        exact = al.allocate(layers, options, budget, lambda u: al.errors_from_kl(kl, layers, u, options, mse),
                            by="quant_sensitivity", **common)
        cheap_plan = al.allocate(layers, options, budget, lambda u: al.errors_from_importance(imp, layers, u, mse),
                                 by=best, **common)
        names = ["exact MILP by quant_sensitivity", f"exact MILP by {best}"]
        order[budget] = names + order[budget]
        run(budget, names[0], exact)
        run(budget, names[1], cheap_plan)
        for r in al.random_plans(exact, layers, seeds):
            name = f"random placement (seed {r.by.split()[-1]})"
            order[budget].append(name)
            run(budget, name, r)
    rows = [evaluated[(b, n)] for b in budgets for n in order[b]]

    # ------------------------------------------------------------------ printed summary
    print()
    print("Mixed-precision allocation on SmolLM2-135M-Instruct (30 blocks), held-out Wikipedia perplexity")
    print(f"  {proto.describe()}; options bits {{2,3,4,8}} x group {{64,128}}, RTN (HQQ optimize=False)")
    print(f"  bpw = HQQ storage incl. float16 scale+zero per group, over the blocks' linear layers")
    print(f"  quant_sensitivity: per-block KL at 2/3/4 bits g64 on {calib_tokens} calibration tokens")
    print(f"  best cheap metric: {best} (Spearman with quant_sensitivity {cheap[best]:+.2f})")
    print(f"  {PRE_ROUNDED_NOTE}")
    print(f"  unquantized (dequantized Q4_1, fp32) perplexity: {base:.4f}")
    for budget in budgets:
        print(f"\n  budget {budget:g} bpw")
        print(f"  {'plan':<44s} {'bpw':>7s} {'perplexity':>11s} {'vs fp32':>8s}")
        rs = [r for r in rows if r["budget"] == budget]
        for r in rs:
            print(f"  {r['name']:<44s} {r['bpw']:7.4f} {r['perplexity']:11.4f} {r['perplexity'] / base - 1:+8.1%}")
        rnd = [r["perplexity"] for r in rs if r["name"].startswith("random")]
        if rnd:
            print(f"  {'random placement: mean (min..max)':<44s} {'':7s} {np.mean(rnd):11.4f}  "
                  f"({min(rnd):.2f}..{max(rnd):.2f})")
    print(f"\n  {ev.evaluations} evaluations, {ev.seconds:.0f} s evaluating, {time.perf_counter() - t0:.0f} s total")

    OUT.mkdir(parents=True, exist_ok=True)
    result = {"baseline_perplexity": base, "protocol": proto.model_dump(), "best_cheap_metric": best,
              "spearman_with_quant_sensitivity": cheap, "rows": rows, "note": PRE_ROUNDED_NOTE}
    (OUT / "quant_allocation.json").write_text(json.dumps(result, indent=2))
    attach(table, allocation_bench=rows)
    try:
        from layerscope.report import render_report

        (OUT / "quant_allocation_report.html").write_text(render_report(table), encoding="utf-8")
    except Exception as exc:  # the report package is another feature; the numbers above stand
        log(f"report not written: {exc}")
    log(f"wrote {OUT / 'quant_allocation.json'}")


if __name__ == "__main__":
    main()
