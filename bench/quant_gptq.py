"""Bench: RTN vs GPTQ, uniform vs exact per-linear allocation vs llama.cpp's rule, at 3.0-4.5 bpw on SmolLM2.

    PYTHONPATH=src .venv/bin/python bench/quant_gptq.py

One run prints the whole table. Every row: held-out Wikipedia perplexity, same protocol (the
evaluation split, LAYERSCOPE_BENCH_EVAL_TOKENS tokens, context 512, disjoint windows, fp32 compute).
Options: bits {2,3,4,8} x group {32,64,128}; bpw counted in HQQ's storage format for every row
(codes + 16-bit scale and zero per group; 3-bit packs ten codes per int32). Rows:
  * RTN-uniform / GPTQ-uniform: the best single option within the budget (GPTQ groups must divide
    the row, so g128 on 576-wide rows is realised as g64 and costed as such);
  * RTN-MILP / GPTQ-MILP: exact MILP per linear layer over the losses measured for every
    candidate with its own quantizer (compress.quant_stats; one gradient pass + one statistics pass
    on LAYERSCOPE_BENCH_CALIB_TOKENS calibration tokens; token_fisher loss model, each option's
    estimates rescaled by its measured uniform plan);
  * RTN-exact / GPTQ-exact: what `quantize --by measured` ships: among the uniform plan and the MILP
    plans changing at most 1, 2, 4, ... 64 layers from it (or any number), the one with the least
    ΔNLL measured on LAYERSCOPE_BENCH_SEARCH_TOKENS (4,096) calibration tokens that follow those of the
    estimates (plans.quant_measured.measured_search; LAYERSCOPE_BENCH_RAY=local: the plans as Ray tasks);
  * llama.cpp rule: use_more_bits() blocks get the higher option (RTN), as in bench/quant_allocation.py.
GPTQ here uses the Hessians of the unquantized model (not sequential), damping LAYERSCOPE_BENCH_DAMP (0.1), no act-order.
For the exact rows the predicted ΔNLL (nats/token) is printed next to the measured ln(ppl/ppl_fp32).
At LAYERSCOPE_BENCH_SAVE_BUDGET (4.0) the GPTQ-exact model is saved as compressed-tensors
pack-quantized, reloaded with transformers.AutoModelForCausalLM and its logits compared.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quant_common import OUT, log, wait_for_assets  # noqa: E402


ROWS = ("RTN-uniform", "RTN-MILP", "RTN-exact", "GPTQ-uniform", "GPTQ-MILP", "GPTQ-exact", "llama.cpp rule")


def main() -> None:
    import torch

    from layerscope.actions.export.compressed import save_compressed, validate_reload
    from layerscope.actions.quantize_measured import calibration_batches, perplexity_with
    from layerscope.compress.quant import fake_quant
    from layerscope.compress.quant_stats import CandidateLosses, apply_gptq, measure_candidates
    from layerscope.evaluation.perplexity import PerplexityProtocol, token_stream
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model
    from layerscope.plans import allocate as al
    from layerscope.plans.quant_measured import exact_plan, uniform_plan

    eval_tokens = int(os.environ.get("LAYERSCOPE_BENCH_EVAL_TOKENS", 4096))
    calib_tokens = int(os.environ.get("LAYERSCOPE_BENCH_CALIB_TOKENS", 4096))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))  # small ops: OpenMP barriers cost more than they give
    budgets = [float(x) for x in os.environ.get("LAYERSCOPE_BENCH_BUDGETS", "3.0,3.5,4.0,4.25,4.5").split(",")]
    save_budget = float(os.environ.get("LAYERSCOPE_BENCH_SAVE_BUDGET", 4.0))
    model_name = os.environ.get("LAYERSCOPE_BENCH_MODEL") or None
    t0 = time.perf_counter()
    wait_for_assets()
    lm = load_model(model_name)
    parts = find_parts(lm.model)
    layers = al.model_layers(parts)
    proto = PerplexityProtocol(max_tokens=eval_tokens)
    ids = token_stream(lm.tokenizer, proto)
    base = perplexity_with(lm.model, ids, proto, None)
    log(f"{lm.model_id}: fp32 perplexity {base:.4f} ({proto.describe()})")

    wanted = [x.strip() for x in os.environ.get("LAYERSCOPE_BENCH_ROWS", ",".join(ROWS)).split(",") if x.strip()]
    methods = os.environ.get("LAYERSCOPE_BENCH_METHODS", "rtn,gptq").split(",")  # split over processes, then --merge
    wanted = [r for r in wanted if r.split("-")[0].lower() in methods or (r == "llama.cpp rule" and "rtn" in methods)]
    loss_model = os.environ.get("LAYERSCOPE_BENCH_LOSS_MODEL", "token_fisher")
    joint_tokens = int(os.environ.get("LAYERSCOPE_BENCH_JOINT_TOKENS", 4096))
    search_tokens = int(os.environ.get("LAYERSCOPE_BENCH_SEARCH_TOKENS", 4096))  # quantize --search-tokens
    ray = os.environ.get("LAYERSCOPE_BENCH_RAY") or None  # quantize --ray: search trials as Ray tasks
    rtn_opts = al.parse_options([2, 3, 4, 8], [32, 64, 128], "rtn") if "rtn" in methods else []
    gptq_opts = al.parse_options([2, 3, 4, 8], [32, 64, 128], "gptq") if "gptq" in methods else []
    if not set(wanted) & {"RTN-exact", "GPTQ-uniform", "GPTQ-exact"}:  # rows that need no calibration
        calib_tokens = 0
        both = CandidateLosses(options=rtn_opts + gptq_opts)
    batches = calibration_batches(lm.tokenizer, calib_tokens, 512) if calib_tokens else None
    t = time.perf_counter()
    from layerscope.actions.quantize_measured import checkpoint_key
    from layerscope.compress.quant_stats import Checkpoint

    damp = float(os.environ.get("LAYERSCOPE_BENCH_DAMP", 0.1))  # quantize's default
    ck_dir = OUT / (f"quant_gptq_checkpoint_{lm.model_id.replace('/', '_')}_{calib_tokens}_damp{damp:g}_"
                    f"{'+'.join(methods)}_{loss_model}_joint{joint_tokens}")
    ck = Checkpoint(ck_dir, checkpoint_key(lm, rtn_opts + gptq_opts, calib_tokens, 512, damp, False, loss_model,
                                           joint_tokens))
    resume = (ck_dir / "candidate_losses.json").is_file()
    only = os.environ.get("LAYERSCOPE_BENCH_MEASURE_BLOCKS")  # "a-b": measure these blocks only, then stop
    if only:
        lo, hi = (int(x) for x in only.split("-"))
        measure_candidates(parts, batches, rtn_opts + gptq_opts, log=log, checkpoint=ck, resume=resume,
                           keep_hessians=False, only_blocks=lambda i: lo <= i <= hi, damp=damp,
                           loss_model=loss_model, joint_tokens=joint_tokens)
        log(f"measured blocks {lo}-{hi} into {ck_dir}")
        return
    if calib_tokens:
        both = measure_candidates(parts, batches, rtn_opts + gptq_opts, log=log, checkpoint=ck, resume=resume,
                                  damp=damp, loss_model=loss_model, joint_tokens=joint_tokens)
    t_measure = time.perf_counter() - t
    log(f"measured {len(both.losses)} layers x {len(both.options)} candidates in {t_measure:.0f} s")
    split = {meth: both.subset(opts) for meth, opts in (("rtn", rtn_opts), ("gptq", gptq_opts)) if opts}
    common = dict(fmt="hqq", num_layers=parts.num_layers, blocks_path=parts.blocks_path)
    mods = dict(lm.model.named_modules())

    def weights_of(plan):
        if plan.method == "gptq":
            orig = {e.name: mods[e.name].weight.data for e in plan.entries}
            try:
                q = apply_gptq(parts, plan.assignment(), hessians=both.hessians)
                return {n: mods[n].weight.data for n in orig}, q
            finally:
                for n, w in orig.items():
                    mods[n].weight.data = w
        a = plan.assignment()
        return {n: fake_quant(mods[n].weight.data, s) for n, s in a.items()}, None

    scorers = {}

    def searched(meth, budget):  # as `quantize --by measured` does: trust-region plans measured on calibration text
        from layerscope.actions.quantize_measured import PlanScorer, search_batches
        from layerscope.plans.quant_measured import measured_search

        if meth not in scorers:  # one per method: its cache of quantized (layer, scheme) pairs serves every budget
            kw = dict(tokens=search_tokens, hessians=both.hessians)
            held_out = search_batches(lm.tokenizer, calib_tokens, search_tokens)  # text the estimates did not see
            if ray:
                from layerscope.actions.quantize_parallel import RayPlanScorer

                scorers[meth] = RayPlanScorer(parts, held_out, address=ray, **kw)
            else:
                scorers[meth] = PlanScorer(parts, held_out, **kw)
        p, trials = measured_search(layers, split[meth], budget, scorers[meth].many, method=meth, log=log, **common)
        searches.append({"budget": budget, "method": meth, "trials": trials})
        return p

    searches = []
    rows, saved = [], {}
    for budget in budgets:
        measured = bool(both.losses)
        plans = {
            "RTN-uniform": lambda: uniform_plan(layers, rtn_opts, budget, method="rtn",
                                                losses=split["rtn"] if measured else None, **common),
            "RTN-MILP": lambda: exact_plan(layers, split["rtn"], budget, method="rtn", **common),
            "RTN-exact": lambda: searched("rtn", budget),
            "GPTQ-uniform": lambda: uniform_plan(layers, gptq_opts, budget, method="gptq", losses=split["gptq"],
                                                 **common),
            "GPTQ-MILP": lambda: exact_plan(layers, split["gptq"], budget, method="gptq", **common),
            "GPTQ-exact": lambda: searched("gptq", budget),
            "llama.cpp rule": lambda: al.llamacpp_plan(layers, rtn_opts, budget, **common)}
        for name in [r for r in ROWS if r in wanted]:
            p = plans[name]()
            t = time.perf_counter()
            w, q = weights_of(p)
            ppl = perplexity_with(lm.model, ids, proto, w)
            measured = math.log(ppl / base)
            row = {"budget": budget, "name": name, "by": p.by, "bpw": p.achieved_bpw, "perplexity": ppl,
                   "vs_fp32": ppl / base - 1, "predicted_dnll": p.objective if p.strategy in ("milp", "uniform") and
                   name != "llama.cpp rule" else None, "measured_dnll": measured,
                   "mix": _mix(p)}
            rows.append(row)
            pred = f"predicted ΔNLL {row['predicted_dnll']:.4f} " if row["predicted_dnll"] is not None else ""
            log(f"{budget:g} bpw  {name:<15s} {p.achieved_bpw:.4f} bpw  ppl {ppl:9.4f} ({ppl / base - 1:+.1%})  "
                f"{pred}measured ΔNLL {measured:.4f}  ({time.perf_counter() - t:.0f} s)  {row['mix']}")
            if name == "GPTQ-exact" and abs(budget - save_budget) < 1e-9:
                saved = _save_and_reload(lm, mods, w, q, ids, save_compressed, validate_reload)

    result = {"model": lm.model_id, "num_layers": parts.num_layers, "baseline_perplexity": base,
              "protocol": proto.model_dump(), "protocol_text": proto.describe(), "calib_tokens": calib_tokens,
              "measure_seconds": t_measure, "candidates": len(both.options), "layers": len(both.losses),
              "budgets": budgets, "rows": rows, "saved": saved, "save_budget": save_budget,
              "loss_model": loss_model, "joint_tokens": joint_tokens, "joint": both.joint, "searches": searches,
              "search_tokens": search_tokens,
              "seconds": time.perf_counter() - t0}
    print_table(result)
    OUT.mkdir(parents=True, exist_ok=True)
    tag = os.environ.get("LAYERSCOPE_BENCH_TAG", "")
    path = OUT / f"quant_gptq{'_' + tag if tag else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    log(f"wrote {path}")
    del torch


def print_table(r: dict) -> None:
    base, rows = r["baseline_perplexity"], r["rows"]
    print()
    print(f"Quantization on {r['model']} ({r['num_layers']} blocks): held-out Wikipedia perplexity")
    print(f"  {r['protocol_text']}; calibration {r['calib_tokens']} tokens (Wikipedia calibration split, 512-token windows)")
    print("  options bits {2,3,4,8} x group {32,64,128}; bpw in HQQ's storage format (scale+zero per group) for all rows")
    print(f"  fp32 perplexity {base:.4f}" + (" (SmolLM2 weights are dequantized Q4_1)" if r["model"] == "smollm2" else ""))
    print(f"  measurement of {r['candidates']} candidates x {r['layers']} layers: {r['measure_seconds']:.0f} s; "
          f"search trials measured on {r.get('search_tokens', 4096)} further calibration tokens")
    for budget in r["budgets"]:
        print(f"\n  budget {budget:g} bpw")
        print(f"  {'plan':<16s} {'bpw':>7s} {'ppl':>10s} {'vs fp32':>8s} {'pred ΔNLL':>10s} {'meas ΔNLL':>10s}  mix")
        rs = [x for x in rows if x["budget"] == budget]
        best = min(x["perplexity"] for x in rs)
        for x in rs:
            pred = f"{x['predicted_dnll']:10.4f}" if x["predicted_dnll"] is not None else f"{'-':>10s}"
            print(f"  {x['name']:<16s} {x['bpw']:7.4f} {x['perplexity']:10.4f} {x['vs_fp32']:+8.1%} {pred} "
                  f"{x['measured_dnll']:10.4f}  {x['mix']}" + ("  <- best" if x["perplexity"] == best else ""))
    s = r.get("saved")
    if s:
        print(f"\n  GPTQ-exact at {r['save_budget']:g} bpw saved as compressed-tensors pack-quantized "
              f"({s['mb']:.1f} MB safetensors), reloaded with transformers.AutoModelForCausalLM: "
              f"max |logit diff| vs the in-memory model {s['max_abs_logit_diff']:.3g} on {s['tokens']} tokens")
    print(f"\n  total {r['seconds']:.0f} s")


def merge(paths: list[str]) -> None:
    """Print one table from the JSON of runs that split the budgets (LAYERSCOPE_BENCH_BUDGETS/_TAG)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    r = dict(parts[0])
    if any(abs(p["baseline_perplexity"] - r["baseline_perplexity"]) > 1e-9 for p in parts):
        raise SystemExit("the runs do not share one baseline (different protocol or model)")
    r["budgets"] = sorted(b for p in parts for b in p["budgets"])
    r["rows"] = sorted((x for p in parts for x in p["rows"]), key=lambda x: (x["budget"], ROWS.index(x["name"])))
    r["budgets"] = sorted(set(r["budgets"]))
    r["calib_tokens"] = max(p["calib_tokens"] for p in parts)
    r["measure_seconds"] = max(p["measure_seconds"] for p in parts)
    r["layers"] = max(p["layers"] for p in parts)
    r["saved"] = next((p["saved"] for p in parts if p.get("saved")), {})
    r["seconds"] = max(p["seconds"] for p in parts)
    print_table(r)


def _mix(plan) -> str:
    from collections import Counter

    c = Counter()
    for e in plan.entries:
        c[f"{e.bits}b/g{e.group_size}"] += e.shape[0] * e.shape[1]
    n = sum(c.values())
    return " ".join(f"{k}:{v / n:.0%}" for k, v in sorted(c.items()))


def _save_and_reload(lm, mods, w, q, ids, save_compressed, validate_reload) -> dict:
    orig = {n: mods[n].weight.data for n in w}
    try:
        for n, t in w.items():
            mods[n].weight.data = t
        d = Path(tempfile.mkdtemp(prefix="quant_gptq_"))
        save_compressed(lm.model, q, d / "model")
        mb = sum(f.stat().st_size for f in (d / "model").glob("*.safetensors")) / 2 ** 20
        x = ids[:512][None, :]
        diff = validate_reload(d / "model", lm.model, x)
    finally:
        for n, t in orig.items():
            mods[n].weight.data = t
    log(f"saved + reloaded with transformers: max |logit diff| {diff:.3g}")
    return {"max_abs_logit_diff": diff, "tokens": int(x.numel()), "mb": mb, "dir": str(d / "model")}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--merge":
        merge(sys.argv[2:])
    else:
        main()
