"""Bench: SmolLM2-135M (30 blocks) without 7 blocks (~25 %), for every removal ordering.

Prints, in one run: the unpruned baseline; held-out Wikipedia perplexity after removing 7 blocks by
each ranking metric of a default scan (one shot, least important first), by the reverse of the best
metric, by 5 random orders (median and range) and by the greedy ablation order (the reference).
Then it writes the greedy-pruned model with `layerscope prune`, reloads it with plain transformers
and checks that its perplexity reproduces layerscope's in-memory number (relative difference).

    .venv/bin/python bench/prune_orders.py [--tokens 8192] [--greedy-tokens 1024] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=8192, help="evaluated Wikipedia (evaluation split) tokens")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--scan-tokens", type=int, default=4096)
    ap.add_argument("--greedy-tokens", type=int, default=1024, help="calibration tokens for the greedy order")
    ap.add_argument("--random", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--json", type=Path, default=None, help="also write the sweep result here")
    args = ap.parse_args()

    import torch
    import transformers

    from layerscope.data import assets
    from layerscope.actions.prune import prune
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity
    from layerscope.model.loading import load_model
    from layerscope.metrics.scan import scan
    from layerscope.evaluation.sweep import OrderSpec, ranking_columns, run_sweep

    if not assets.is_ready("smollm2") or not assets.is_ready("wikipedia"):
        print("SmolLM2 / Wikipedia assets are not prepared (layerscope assets fetch)")
        return 1
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    table = scan(model, None, None, tokenizer=tok, tokens=args.scan_tokens)
    metrics = ranking_columns(table, "block")
    print(f"model {loaded.model_id} ({model.config.num_hidden_layers} blocks), scan of {table.provenance.calibration_source}"
          f" {table.provenance.calibration_tokens} tokens in {table.provenance.wall_time_s:.0f} s; "
          f"{len(metrics)} block ranking metrics; torch threads {args.threads}", flush=True)
    protocol = PerplexityProtocol(dataset="wikipedia", split="evaluation", context_length=args.context,
                                  stride=args.context, max_tokens=args.tokens, batch_size=4)
    orders = [OrderSpec("metric", m) for m in metrics] + [OrderSpec("reverse"), OrderSpec("random", str(args.random)),
                                                          OrderSpec("greedy")]
    res = run_sweep(model, tok, unit="block", ks=[0, args.remove], orders=orders, table=table, protocol=protocol,
                    greedy_tokens=args.greedy_tokens, model_id=loaded.model_id,
                    weights_sha256=loaded.weights_sha256, log=lambda s: print("  " + s, flush=True))
    K = args.remove
    print()
    print(f"Held-out perplexity, {protocol.describe()}, after removing {K} of 30 blocks")
    print(f"{'ordering':34s} {'ppl':>10s}  removed blocks")
    print(f"{'(unpruned baseline)':34s} {res['baseline']:10.3f}")
    rows = [(c["label"], c["perplexity"][1], sorted(c["order"][:K])) for c in res["curves"]]
    g = res["greedy"]
    rows.append((f"greedy ablation (reference)", g["perplexity"][1], sorted(g["order"][:K])))
    for label, y, rem in sorted(rows, key=lambda r: r[1]):
        print(f"{label:34s} {y:10.3f}  {rem}")
    r = res["random"]
    ys = [row[1] for row in r["perplexity"]]
    print(f"{'random x' + str(r['n']) + ' median [min, max]':34s} {statistics.median(ys):10.3f}  "
          f"[{min(ys):.3f}, {max(ys):.3f}]")
    print(f"greedy order source: {g['source']}; selection on {g.get('selection_data')} "
          f"({g.get('selection_tokens')} tokens)")

    # a written directory, reloaded with plain transformers, reproduces the in-memory perplexity
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "smollm2-pruned"
        prune(None, units=g["order"][:K], unit="block", out=out)
        plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        ptok = transformers.AutoTokenizer.from_pretrained(out)
        ppl = perplexity(plain, ptok, protocol).perplexity
        rel = abs(ppl - g["perplexity"][1]) / g["perplexity"][1]
        print(f"plain AutoModelForCausalLM.from_pretrained(pruned dir): {plain.config.num_hidden_layers} blocks, "
              f"perplexity {ppl:.6f} vs layerscope in-memory {g['perplexity'][1]:.6f} (relative difference {rel:.2e})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return 0 if rel <= 1e-4 else 2


if __name__ == "__main__":
    sys.exit(main())
