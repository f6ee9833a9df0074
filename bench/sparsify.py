"""Sparsity bench: SmolLM2 held-out Wikipedia perplexity at 50/60/70 % unstructured and 2:4.

Rows: magnitude, Wanda-uniform, Wanda-OWL, Wanda-exact, SparseGPT-uniform, SparseGPT-OWL (and
SparseGPT-exact with --sparsegpt-exact). Every row reads ONE non-sequential statistics pass over the
dense model (XᵀX of every linear on the calibration windows; one-shot pruning from dense inputs, so the
rows differ only in pruner and allocation — the CLI's default is the sequential pass). OWL: λ = 0.08,
M = 5. Exact: the exact allocator over each block's measured loss curve, choosing from the levels the
CLI offers (target ± 3 × 0.05), curves made non-decreasing as the CLI does, under two loss models:
  * "exact (output KL)" -- the CLI's default: KL(dense ‖ block i pruned alone) of the model's
    next-token distributions on the first --kl-tokens calibration tokens (compress.blockwise.OutputTap);
  * "exact (block error)" -- the block's own relative output error on the first --tap-seqs windows.
"predicted" is the loss model's total for the plan next to the measured perplexity.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/sparsify.py --calib 32x128 --eval-tokens 4096
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
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
    ap.add_argument("--kl-tokens", type=int, default=512, help="calibration tokens of the output-KL curves")
    ap.add_argument("--workers", type=int, default=4, help="forked processes evaluating rows")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)

    from layerscope.actions.sparsify import _block_params, _linear_only
    from layerscope.actions.sparsify import _loss_rows
    from layerscope.compress.blockwise import BlockTap, OutputTap, calibration_windows, swapped_weights
    from layerscope.compress.sparse import prune_weight, wanda_score
    from layerscope.engine.moments import linear_moments
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity, token_stream
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model
    from layerscope.plans.allocator import UnitOptions, allocate_exact, evaluate_choice
    from layerscope.plans.sparsify import candidate_levels, outlier_ratio, spread_levels

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
    targets_grid = sorted({x for S in targets for x in candidate_levels(S)})  # the levels the CLI offers
    wgrid = targets_grid
    sgrid = targets_grid
    log(f"# {lm.model_id}: {L} blocks, calibration {n_seq}x{seq_len} = {ids.numel()} tokens (wikipedia calibration "
        f"split), eval {proto.describe()}")

    stats_all: list[dict] = []
    lod: list[float] = []
    curves = {"wanda": [], "sparsegpt": []}  # block error
    kl_curves = {"wanda": [], "sparsegpt": []}  # output KL
    tap = BlockTap(parts.blocks, 1)  # the first batch (--tap-seqs windows)
    out_tap = OutputTap(parts, ids[:_loss_rows(ids, args.kl_tokens)])
    t0 = time.time()

    def on_block(i, block, stats):
        mods = {n: st.module for n, st in stats.items()}
        lod.append(outlier_ratio([wanda_score(st.module.weight, st.col_norms()) for st in stats.values()], 5.0))
        for method, grid in (("wanda", wgrid), ("sparsegpt", sgrid if args.sparsegpt_exact else [])):
            row, kl_row = [], []
            for s in grid:
                new = {n: prune_weight(method, st.module.weight.data, s, "unstructured", st) for n, st in stats.items()}
                with swapped_weights(mods, new):
                    row.append(tap.error(i))
                    armed, tap.armed = tap.armed, set()  # the KL runs later blocks: keep them out of the tap
                    kl_row.append(out_tap.kl(i))
                    tap.armed = armed
            curves[method].append(row)
            kl_curves[method].append(kl_row)
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

    def units_for(method, grid, source):
        return [UnitOptions(f"b{i}", grid, [bp[i] * (1 - s) for s in grid], source[method][i]) for i in range(L)]

    def monotone(source, S):
        """The CLI's curves at target S: its candidate levels, made non-decreasing in sparsity."""
        grid = candidate_levels(S)
        cols = [wgrid.index(x) for x in grid]
        out = {m: [list(np.maximum.accumulate([c[k] for k in cols])) for c in cs] for m, cs in source.items() if cs and cs[0]}
        return grid, out

    def exact(method, S, source):
        grid, cs = monotone(source, S)
        ex = allocate_exact(units_for(method, grid, cs), (1 - S) * sum(bp) * (1 + 1e-9))
        return [float(x) for x in ex.chosen], ex.predicted_loss

    def pred(method, S, lv, source):
        grid, cs = monotone(source, S)
        return evaluate_choice(units_for(method, grid, cs), lv).predicted_loss if all(l in grid for l in lv) else None

    specs = []
    for S in ([] if args.only_nm else targets):
        owl_r = [round(x, 6) for x in spread_levels(lod, S, 0.08, block_params=bp)]
        ex_kl, p_kl = exact("wanda", S, kl_curves)
        ex_be, p_be = exact("wanda", S, curves)
        specs += [(S, "unstructured", "wanda", "uniform", [S] * L, pred("wanda", S, [S] * L, kl_curves)),
                  (S, "unstructured", "wanda", "owl", owl_r, None),
                  (S, "unstructured", "wanda", "exact (output KL)", ex_kl, p_kl),
                  (S, "unstructured", "wanda", "exact (block error)", ex_be, p_be),
                  (S, "unstructured", "sparsegpt", "uniform", [S] * L, None),
                  (S, "unstructured", "sparsegpt", "owl", owl_r, None),
                  (S, "unstructured", "magnitude", "uniform", [S] * L, None)]
        if args.sparsegpt_exact:
            ex, pe = exact("sparsegpt", S, kl_curves)
            specs.append((S, "unstructured", "sparsegpt", "exact (output KL)", ex, pe))
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
        if str(r.get("allocation")).startswith("exact"):
            log(f"exact {r['method']} levels at {r['target']}: " + " ".join(f"{x:.2f}" for x in r["levels"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "lod": lod, "curves": curves, "kl_curves": kl_curves, "wgrid": wgrid, "sgrid": sgrid,
                       "calibration_tokens": int(ids.numel()), "eval": proto.model_dump()}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
