"""Sparsity bench: SmolLM2 held-out Wikipedia perplexity at 50/60/70 % unstructured and 2:4.

Rows: magnitude, Wanda-uniform, Wanda-OWL, Wanda-exact, SparseGPT-uniform, SparseGPT-OWL (and
SparseGPT-exact with --sparsegpt-exact). Every row reads ONE non-sequential statistics pass over the
dense model (XᵀX of every linear on the calibration windows; one-shot pruning from dense inputs, so the
rows differ only in pruner and allocation — the CLI's default is the sequential pass). OWL: λ = 0.08,
M = 5. Exact: the exact allocator over each block's measured loss curve (relative block-output error
of the block pruned alone, on the first calibration batch), grid 0.40..0.85 step 0.05 for Wanda (measured on --tap-seqs calibration windows).
"predicted" is the loss model's total for the plan next to the measured perplexity.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/sparsify.py --calib 32x128 --eval-tokens 4096
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __import__('os').path.dirname(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib", default="32x128", help="sequences x tokens")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--targets", default="0.5,0.6,0.7")
    ap.add_argument("--sparsegpt-exact", action="store_true")
    ap.add_argument("--skip-nm", action="store_true")
    ap.add_argument("--only-nm", action="store_true")
    ap.add_argument("--tap-seqs", type=int, default=4, help="windows per batch; the first batch measures the curves")
    ap.add_argument("--workers", type=int, default=4, help="forked processes evaluating rows")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)

    from layerscope.actions.sparsify import _block_params, _linear_only
    from layerscope.compress.blockwise import BlockTap, calibration_windows, swapped_weights
    from layerscope.compress.sparse import prune_weight, wanda_score
    from layerscope.engine.moments import linear_moments
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity, token_stream
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model
    from layerscope.plans.allocator import UnitOptions, allocate_exact, evaluate_choice
    from layerscope.plans.sparsify import outlier_ratio, spread_levels

    def log(m):
        print(m, flush=True)

    n_seq, seq_len = (int(x) for x in args.calib.split("x"))
    lm = load_model(args.model)
    parts = find_parts(lm.model)
    L = parts.num_layers
    bp = _block_params(parts, _linear_only)
    ids = calibration_windows(lm.tokenizer, n_seq * seq_len, seq_len)
    proto = PerplexityProtocol(max_tokens=args.eval_tokens)
    eval_ids = token_stream(lm.tokenizer, proto)
    targets = [float(x) for x in args.targets.split(",")]
    wgrid = [round(0.4 + 0.05 * k, 2) for k in range(10)]  # 0.40 .. 0.85
    sgrid = [0.4, 0.5, 0.6, 0.7, 0.8]
    log(f"# {lm.model_id}: {L} blocks, calibration {n_seq}x{seq_len} = {ids.numel()} tokens (wikipedia calibration "
        f"split), eval {proto.describe()}")

    stats_all: list[dict] = []
    lod: list[float] = []
    curves = {"wanda": [], "sparsegpt": []}
    tap = BlockTap(parts.blocks, 1)  # the first batch (--tap-seqs windows)
    t0 = time.time()

    def on_block(i, block, stats):
        mods = {n: st.module for n, st in stats.items()}
        lod.append(outlier_ratio([wanda_score(st.module.weight, st.col_norms()) for st in stats.values()], 5.0))
        for method, grid in (("wanda", wgrid), ("sparsegpt", sgrid if args.sparsegpt_exact else [])):
            row = []
            for s in grid:
                new = {n: prune_weight(method, st.module.weight.data, s, "unstructured", st) for n, st in stats.items()}
                with swapped_weights(mods, new):
                    row.append(tap.error(i))
            curves[method].append(row)
        tap.release(i)
        for st in stats.values():
            st.xtx = st.xtx.float()
            st._sparsegpt_hinv = None
        stats_all.append(stats)
        log(f"  stats block {i} ({time.time() - t0:.0f} s)")

    with tap.attached():
        linear_moments(parts, ids, on_block=on_block, sequential=False, select=_linear_only,
                       batch_size=args.tap_seqs)
    log(f"statistics pass + loss curves: {time.time() - t0:.0f} s")

    dense = {f"{i}.{n}": st.module.weight.data.clone() for i, s in enumerate(stats_all) for n, st in s.items()}

    def ppl_with(method, pattern, levels):
        t = time.time()
        for i, stats in enumerate(stats_all):
            for n, st in stats.items():
                st.module.weight.data = prune_weight(method, dense[f"{i}.{n}"], levels[i], pattern, st)
        p = perplexity(lm.model, ids=eval_ids, protocol=proto).perplexity
        for i, stats in enumerate(stats_all):
            for n, st in stats.items():
                st.module.weight.data = dense[f"{i}.{n}"]
        return p, time.time() - t

    rows = []
    log("\n| sparsity | pattern | method | allocation | achieved | predicted loss | perplexity | s |")
    log("|---|---|---|---|---|---|---|---|")

    def units_for(method, grid):
        return [UnitOptions(f"b{i}", grid, [bp[i] * (1 - s) for s in grid], curves[method][i]) for i in range(L)]

    def pred(method, grid, lv):
        return (evaluate_choice(units_for(method, grid), lv).predicted_loss
                if curves[method] and all(l in grid for l in lv) else None)

    specs = []
    for S in ([] if args.only_nm else targets):
        owl_r = [round(x, 6) for x in spread_levels(lod, S, 0.08, block_params=bp)]
        ex = allocate_exact(units_for("wanda", wgrid), (1 - S) * sum(bp) * (1 + 1e-9))
        specs += [(S, "unstructured", "wanda", "uniform", [S] * L, pred("wanda", wgrid, [S] * L)),
                  (S, "unstructured", "wanda", "owl", owl_r, pred("wanda", wgrid, owl_r)),
                  (S, "unstructured", "wanda", "exact", [float(x) for x in ex.chosen], ex.predicted_loss),
                  (S, "unstructured", "sparsegpt", "uniform", [S] * L, None),
                  (S, "unstructured", "sparsegpt", "owl", owl_r, None),
                  (S, "unstructured", "magnitude", "uniform", [S] * L, None)]
        if args.sparsegpt_exact and S in sgrid:
            ex = allocate_exact(units_for("sparsegpt", sgrid), (1 - S) * sum(bp) * (1 + 1e-9))
            specs.append((S, "unstructured", "sparsegpt", "exact", [float(x) for x in ex.chosen], ex.predicted_loss))
        log(f"  OWL levels at {S}: " + " ".join(f"{x:.3f}" for x in owl_r))
    if not args.skip_nm:
        specs += [(0.5, "2:4", m, "uniform", [0.5] * L, None) for m in ("wanda", "sparsegpt", "magnitude")]
    if not args.no_dense:
        specs.insert(0, (0.0, "dense", "magnitude", "-", [0.0] * L, None))

    from _pool import run_rows

    for spec, (p, sec) in run_rows(lambda sp: ppl_with(sp[2], "unstructured" if sp[1] == "dense" else sp[1], sp[4]),
                                   specs, args.workers):
        S, pattern, method, alloc, levels, predicted = spec
        ach = sum(l * n for l, n in zip(levels, bp)) / sum(bp)
        rows.append({"target": S, "pattern": pattern, "method": method if pattern != "dense" else "dense",
                     "allocation": alloc, "levels": levels, "achieved": ach, "predicted": predicted, "ppl": p})
        pr = f"{predicted:.4f}" if predicted is not None else "-"
        log(f"| {S:.2f} | {pattern} | {rows[-1]['method']} | {alloc} | {ach:.4f} | {pr} | {p:.3f} | {sec:.0f} |")
    log("\nOWL outlier ratios (LOD %, M=5): " + " ".join(f"{x:.2f}" for x in lod))
    for r in rows:
        if r.get("allocation") == "exact":
            log(f"exact {r['method']} levels at {r['target']}: " + " ".join(f"{x:.2f}" for x in r["levels"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "lod": lod, "curves": curves, "wgrid": wgrid, "sgrid": sgrid,
                       "calibration_tokens": int(ids.numel()), "eval": proto.model_dump()}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
