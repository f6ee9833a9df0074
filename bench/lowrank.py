"""Low-rank bench: SmolLM2 held-out Wikipedia perplexity at 10/20/30 % parameter reduction of the blocks' linears.

Rows: plain SVD with uniform ranks, whitened SVD (SVD-LLM) with uniform ranks, and whitened SVD with ranks
from the exact allocator under two losses per layer and keep level: "exact (relative)" -- the relative
output error ‖(W−Ŵ)X‖²/‖WX‖² on the calibration XᵀX, every layer alike; "exact (Fisher)" -- the CLI's
default, the predicted ΔNLL ½ Σ_j F_j (E M Eᵀ)_jj (output Fisher from one backward pass); and
(--svd-exact) plain SVD with the relative loss. All rows read ONE non-sequential statistics
pass over the dense model (the CLI's default is sequential). Then one plan is written with
`write_lowrank` and loaded in fresh processes: parameter count and peak RSS of `layerscope.load`
(factorized pairs) vs plain transformers on the dense export.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/lowrank.py --calib 32x128 --eval-tokens 4096
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

# Peak RSS from /proc/self/status VmHWM (kB): it starts afresh at exec, while ru_maxrss would carry the
# forking parent's peak (several GB here) into the child.
_PROBE = r"""
import sys, torch
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
if sys.argv[1] == "factorized":
    import layerscope
    m = layerscope.load(sys.argv[2])
else:
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
with torch.no_grad():
    m(torch.arange(3, 67)[None])
peak = hwm()
print(sum(p.numel() for p in m.parameters()), sum(p.numel() * p.element_size() for p in m.parameters()), base, peak)
"""


ROWS = (("svd", "uniform"), ("whitened", "uniform"), ("whitened", "exact (relative)"), ("whitened", "exact (Fisher)"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib", default="32x128")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--reductions", default="0.1,0.2,0.3")
    ap.add_argument("--write", default="/tmp/layerscope-lowrank-bench")
    ap.add_argument("--svd-exact", action="store_true", help="also plain SVD with allocated ranks")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from layerscope.actions.lowrank import _entry, _linear_only, _rank
    from layerscope.compress.blockwise import calibration_windows
    from layerscope.compress.lowrank import factorize, relative_output_error
    from layerscope.engine.moments import linear_moments
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity, token_stream
    from layerscope.model.adapter import find_parts
    from layerscope.model.factorized import write_lowrank
    from layerscope.model.loading import load_model
    from layerscope.plans.allocator import UnitOptions, allocate_exact, evaluate_choice
    from layerscope.plans.lowrank import KEEP_GRID, LowrankPlan, achieved_reduction

    def log(m):
        print(m, flush=True)

    n_seq, seq_len = (int(x) for x in args.calib.split("x"))
    lm = load_model(args.model)
    parts = find_parts(lm.model)
    ids = calibration_windows(lm.tokenizer, n_seq * seq_len, seq_len)
    proto = PerplexityProtocol(max_tokens=args.eval_tokens)
    eval_ids = token_stream(lm.tokenizer, proto)
    keeps = list(KEEP_GRID) + [1.0]
    log(f"# {lm.model_id}: calibration {n_seq}x{seq_len} = {ids.numel()} tokens, eval {proto.describe()}")

    layers, facts, curves, mods = [], {}, {"svd": {}, "whitened": {}, "whitened-fisher": {}}, {}
    t0 = time.time()
    from layerscope.compress.lowrank import fisher_loss
    from layerscope.compress.quant_stats import output_fisher
    from layerscope.engine.runner import make_batches

    fisher, _ = output_fisher(parts, make_batches(ids, 8)[0])  # as `lowrank --allocation exact` (default loss)
    log(f"output Fisher (one forward+backward over {ids.numel()} tokens): {time.time() - t0:.0f} s")

    def on_block(i, block, stats):
        for n, st in stats.items():
            name = f"{parts.blocks_path}.{i}.{n}"
            W = st.module.weight.data
            layers.append((name, i, n, tuple(W.shape)))
            mods[name] = st.module
            for method in ("svd", "whitened"):
                f = factorize(W, method, st.xtx)
                f.U, f.S, f.Vh = f.U.float(), f.S.float(), f.Vh.float()
                facts[(method, name)] = f
                if method == "whitened":  # exact from the singular values (SVD-LLM), no extra products
                    curves[method][name] = [0.0 if k >= 1 else f.tail_loss(_rank(W.shape, k)) for k in keeps]
                    M = st.xtx / st.tokens
                    curves["whitened-fisher"][name] = [
                        0.0 if k >= 1 else fisher_loss(W, f.weight(_rank(W.shape, k)), M, fisher[name]) for k in keeps]
                elif args.svd_exact:
                    curves[method][name] = [0.0 if k >= 1 else relative_output_error(W, f.weight(_rank(W.shape, k)),
                                                                                    st.xtx) for k in keeps]
        log(f"  block {i} ({time.time() - t0:.0f} s)")

    linear_moments(parts, ids, on_block=on_block, sequential=False, select=_linear_only)
    log(f"statistics pass + factorizations + loss curves: {time.time() - t0:.0f} s")
    dense = {name: m.weight.data.clone() for name, m in mods.items()}
    total = sum(sh[0] * sh[1] for *_, sh in layers)

    def apply(method, ranks):
        for name, r in ranks.items():
            mods[name].weight.data = dense[name] if r is None else facts[(method, name)].weight(r).to(dense[name].dtype)

    def restore():
        for name, m in mods.items():
            m.weight.data = dense[name]

    def units(method):
        return [UnitOptions(nm, keeps, [sh[0] * sh[1] if k >= 1 else _rank(sh, k) * (sh[0] + sh[1]) for k in keeps],
                            curves[method][nm]) for nm, _, _, sh in layers]

    rows = []
    base = perplexity(lm.model, ids=eval_ids, protocol=proto).perplexity
    log(f"dense perplexity {base:.3f}")
    log("\n| reduction | method | allocation | achieved | predicted loss | perplexity | s |")
    log("|---|---|---|---|---|---|---|")
    keep_plans = {}
    for R in (float(x) for x in args.reductions.split(",")):
        for method, alloc in ROWS + ((("svd", "exact"),) if args.svd_exact else ()):
            t = time.time()
            key = "whitened-fisher" if alloc == "exact (Fisher)" else method
            u = units(key) if curves[key] else None
            if alloc == "uniform":
                ranks = {nm: _rank(sh, 1 - R) for nm, _, _, sh in layers}
                pred = None
                if round(1 - R, 4) in keeps and curves[method]:
                    pred = evaluate_choice(u, [round(1 - R, 4)] * len(u)).predicted_loss
            else:
                a = allocate_exact(u, (1 - R) * total)
                ranks = {nm: _rank(sh, k) for (nm, _, _, sh), k in zip(layers, a.chosen)}
                pred = a.predicted_loss
            entries = [_entry(nm, i, n, sh, ranks[nm]) for nm, i, n, sh in layers]
            apply(method, ranks)
            p = perplexity(lm.model, ids=eval_ids, protocol=proto).perplexity
            restore()
            ach = achieved_reduction(entries)
            rows.append({"reduction": R, "method": method, "allocation": alloc, "achieved": ach, "predicted": pred,
                         "ppl": p, "ranks": ranks})
            keep_plans[(R, method, alloc)] = entries
            pr = f"{pred:.3f}" if pred is not None else "-"
            log(f"| {R:.2f} | {method} | {alloc} | {ach:.4f} | {pr} | {p:.3f} | {time.time() - t:.0f} |")

    # write one plan (whitened exact at the middle reduction) and measure loading it
    R = sorted(float(x) for x in args.reductions.split(","))[len(args.reductions.split(",")) // 2]
    entries = keep_plans[(R, "whitened", "exact (Fisher)")]
    plan = LowrankPlan(method="whitened", reduction=R, allocation="exact", achieved_reduction=achieved_reduction(entries),
                       num_layers=parts.num_layers, blocks_path=parts.blocks_path, entries=entries,
                       provenance={"source_model": lm.model_id, "weights_sha256": lm.weights_sha256})
    ranks = plan.ranks()
    factors = {nm: tuple(t.float().contiguous() for t in facts[("whitened", nm)].factors(r))
               for nm, r in ranks.items() if r is not None}
    apply("whitened", ranks)
    import shutil
    from pathlib import Path

    shutil.rmtree(args.write, ignore_errors=True)
    data = {"kind": "layerscope.lowrank", "notes": [], "evaluations": [], "plan": plan.model_dump(mode="json")}
    write_lowrank(lm, plan, factors, Path(args.write), data, force=True, source_dir=None)
    restore()
    log(f"\nwrote whitened-exact (Fisher) {R} to {args.write}; loading each in a fresh process:")
    log("| directory | loader | parameters | parameter bytes | RSS after imports (MB) | peak RSS (MB) |")
    log("|---|---|---|---|---|---|")
    load_rows = []
    for kind, d in (("dense", f"{args.write}/dense"), ("factorized", f"{args.write}/factorized")):
        out = subprocess.run([sys.executable, "-c", _PROBE, kind, d], capture_output=True, text=True, check=True)
        n, nbytes, b, peak = (int(x) for x in out.stdout.split()[-4:])
        load_rows.append({"kind": kind, "params": n, "bytes": nbytes, "rss_base_kb": b, "rss_peak_kb": peak})
        log(f"| {kind} | {'layerscope.load' if kind == 'factorized' else 'transformers'} | {n:,} | {nbytes / 2**20:.1f} MB "
            f"| {b / 1024:.0f} | {peak / 1024:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [{k: v for k, v in r.items() if k != "ranks"} for r in rows], "load": load_rows,
                       "dense_ppl": base, "calibration_tokens": int(ids.numel())}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
