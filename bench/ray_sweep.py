"""The same block-removal sweep run locally and with `--ray` on a local Ray cluster.

Prints both sets of curves, whether they are identical (same perplexities, same JSON apart from the
wall time and creation stamp) and the wall-time ratio ray / local measured in this one run. The
greedy reference order is computed locally in both runs (its steps depend on each other); the
sweep points (every K of every order) are what Ray fans out. The Ray time includes starting the
cluster's workers (cold: each imports torch and receives the model once).

    OMP_NUM_THREADS=1 python bench/ray_sweep.py [--remove 0..4] [--orders block_influence,angular_distance_n1,random:2]
        [--tokens 2048] [--workers 2]
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--remove", default="0..4")
    ap.add_argument("--orders", default="block_influence,angular_distance_n1,random:2")
    ap.add_argument("--tokens", type=int, default=2048, help="evaluated tokens per perplexity point")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--greedy-tokens", type=int, default=512)
    ap.add_argument("--scan-tokens", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import torch

    from layerscope.engine.ray_pool import connect
    from layerscope.evaluation import sweep as sw
    from layerscope.evaluation.perplexity import PerplexityProtocol, token_stream
    from layerscope.metrics.scan import scan
    from layerscope.model.loading import load_model

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); 2 shared cores: timings are noisy")
    lm = load_model(args.model)
    from layerscope.plans.prune import metric_for_column

    names = sorted({metric_for_column(o.arg) for o in sw.parse_orders(args.orders) if o.kind == "metric"})
    table = scan(lm.model, None, names or None, tokenizer=lm.tokenizer, tokens=args.scan_tokens)
    protocol = PerplexityProtocol(context_length=args.context, stride=args.context, max_tokens=args.tokens,
                                  batch_size=4)
    ids = token_stream(lm.tokenizer, protocol)
    n = sw.parse_range(args.remove, table.num_layers, "block")
    kw = dict(unit="block", ks=n, orders=sw.parse_orders(args.orders), table=table, protocol=protocol, ids=ids,
              greedy_tokens=args.greedy_tokens, seed=0, model_id=lm.model_id, weights_sha256=lm.weights_sha256)

    t0 = time.perf_counter()
    local = sw.run_sweep(lm.model, lm.tokenizer, **kw)
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    connect("local", num_cpus=args.workers)
    t_init = time.perf_counter() - t0
    remote = sw.run_sweep(lm.model, lm.tokenizer, **kw, ray="local")
    t_ray = time.perf_counter() - t0

    def curves(d):
        out = {c["label"]: c["perplexity"] for c in d["curves"]}
        out.update({f"random {i}": r for i, r in enumerate(d["random"]["perplexity"])} if d.get("random") else {})
        out["greedy"] = d["greedy"]["perplexity"]
        return out

    print(f"\nmodel {lm.model_id}, K = {n}, {protocol.describe()}, {local['evaluations']} distinct points")
    cl, cr = curves(local), curves(remote)
    print(f"{'order':<24} {'local':<48} ray")
    for k in cl:
        print(f"{k:<24} {' '.join(f'{y:.4f}' for y in cl[k]):<48} {' '.join(f'{y:.4f}' for y in cr[k])}")
    for d in (local, remote):
        d.pop("wall_time_s"), d.pop("created")
    print(f"\nidentical curves: {cl == cr}; identical JSON (apart from wall time / created): {local == remote}")
    print(f"wall time: local {t_local:.1f} s, ray ({args.workers} local workers) {t_ray:.1f} s "
          f"(of which ray.init {t_init:.1f} s); ratio ray / local = {t_ray / t_local:.2f}")


if __name__ == "__main__":
    main()
