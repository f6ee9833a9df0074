"""Bench: leave-one-out block ablation of SmolLM2-135M (30 blocks), prefix reuse vs naive reruns.

Prefix reuse (`layerscope.ground_truth.ablation.leave_one_out`): capture the first block's inputs,
one full pass caching every block's input, then "skip block i" = blocks i+1..29 + head from the
cached input of block i. Naive (`naive_leave_one_out`): for every block, a full forward of the
model with that block physically removed from its block list. Both score with the same code
(KL(full || ablated) of next-token distributions and the ablated NLL on held-out Wikipedia).

Prints, in one run: the per-block numbers of both, the max relative difference (target <= 1e-4),
the block / head evaluation counts, and the wall-time ratio prefix / naive (target <= 0.55).
The two are timed alternately (A B A B ... for --repeats rounds) and the fastest round of each is
compared, so load from other processes on the machine affects both alike.

    .venv/bin/python bench/ablation.py [--tokens 512] [--seq-len 512] [--repeats 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512, help="held-out Wikipedia tokens (evaluation split)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1, help="windows per batch")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds of each method (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    args = ap.parse_args()

    import torch

    from layerscope.data import assets
    from layerscope.model.adapter import find_parts
    from layerscope.data.sources import load_texts
    from layerscope.data.windows import tokenize_windows
    from layerscope.engine.runner import BlockRunner, make_batches
    from layerscope.metrics.ground_truth.ablation import leave_one_out, naive_leave_one_out
    from layerscope.model.loading import load_model

    if not assets.is_ready("smollm2") or not assets.is_ready("wikipedia"):
        print("SmolLM2 / Wikipedia assets are not prepared: run `layerscope assets fetch` first", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    lm = load_model(None)
    parts = find_parts(lm.model)
    L = parts.num_layers
    ids = tokenize_windows(lm.tokenizer, load_texts("wikipedia", split="evaluation"), n_tokens=args.tokens,
                           seq_len=args.seq_len)
    batches, _ = make_batches(ids, args.batch_size)
    print(f"SmolLM2-135M: {L} blocks, {ids.numel()} held-out Wikipedia tokens in {ids.shape[0]} window(s) of "
          f"{ids.shape[1]}, batch {args.batch_size}, torch {torch.__version__}, {args.threads} thread(s)", flush=True)

    def prefix():
        runner = BlockRunner(parts, [dict(b) for b in batches])
        runner.capture()  # counted: the naive path does not need it
        return leave_one_out(runner, units=("block",))

    def naive():
        return naive_leave_one_out(parts, batches, units=("block",))

    # cost model: one block evaluation and one head + scoring evaluation, timed on the same batch
    from layerscope.metrics.ground_truth.ablation import Reference, _cache_inputs

    probe = BlockRunner(parts, [dict(batches[0])])
    probe.capture()
    batch0 = probe.batches[0]
    with torch.no_grad():
        cache, h_final = _cache_inputs(probe, batch0)
        ref = Reference(probe, batch0.inputs["input_ids"], h_final)

        def timed(fn, n=3):
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return statistics.median(out)

        t_block = statistics.median([timed(lambda j=j: probe.forward_block(j, cache[j], batch0), 1) for j in (0, L // 2, L - 1)])
        t_head = timed(lambda: ref.score_hidden(h_final))
    del cache, ref, probe
    n_b = len(batches)
    y = t_head / t_block
    expected = (L + L * (L - 1) / 2 + (L + 1) * y) / (L + L * (L - 1) + (L + 1) * y)
    print(f"cost model (first batch): one block {t_block:.3f} s, final norm + head + scoring {t_head:.3f} s "
          f"= {y:.1f} block evaluations", flush=True)

    times = {"prefix": [], "naive": []}
    results = {}
    for r in range(args.repeats):
        for name, fn in (("prefix", prefix), ("naive", naive)):
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1}: {name:6s} {times[name][-1]:8.1f} s", flush=True)

    a, b = results["prefix"], results["naive"]
    kl_a, kl_b = a.kl("block"), b.kl("block")
    nll_a, nll_b = a.nll("block"), b.nll("block")
    dl_a, dl_b = a.dloss("block"), b.dloss("block")

    def rel(x, y):
        return max(abs(p - q) / max(abs(q), 1e-30) for p, q in zip(x, y))

    print("\nblock  ablation_kl(prefix)  ablation_kl(naive)  dloss(prefix)  dloss(naive)")
    for i in range(L):
        print(f"{i:5d}  {kl_a[i]:19.6g}  {kl_b[i]:18.6g}  {dl_a[i]:13.6g}  {dl_b[i]:12.6g}")
    print(f"\nbase NLL: prefix {a.base_nll:.6f}, naive {b.base_nll:.6f} (perplexity {2.718281828 ** a.base_nll:.3f})")
    d_kl, d_nll = rel(kl_a, kl_b), rel(nll_a, nll_b)
    scale = max(abs(v) for v in dl_b)
    d_dl = max(abs(p - q) for p, q in zip(dl_a, dl_b)) / scale
    worst = max(d_kl, d_nll, d_dl)
    print(f"max relative difference per block: KL {d_kl:.3g}, ablated NLL {d_nll:.3g}, "
          f"dloss {d_dl:.3g} (relative to max |dloss|)  -> {worst:.3g}  (target <= 1e-4: "
          f"{'PASS' if worst <= 1e-4 else 'FAIL'})")
    print(f"block evaluations: prefix {a.block_evaluations}, naive {b.block_evaluations} "
          f"(ratio {a.block_evaluations / b.block_evaluations:.3f}); head evaluations: {a.head_evaluations} each")
    tp, tn = min(times["prefix"]), min(times["naive"])
    ratio = tp / tn
    print(f"wall time (fastest of {args.repeats}): prefix {tp:.1f} s, naive {tn:.1f} s; medians "
          f"{statistics.median(times['prefix']):.1f} s / {statistics.median(times['naive']):.1f} s")
    print(f"wall-time ratio prefix / naive: {ratio:.3f}  (target <= 0.55: {'PASS' if ratio <= 0.55 else 'FAIL'})")
    head_time = n_b * (L + 1) * t_head
    print(f"why: both methods evaluate the {parts.head.weight.shape[0]}-token head + scoring once per ablation "
          f"({L + 1} per batch, ~{head_time:.0f} s of each run here); the cost model predicts a ratio of "
          f"{expected:.3f}; excluding the head, prefix / naive = "
          f"{max(tp - head_time, 0) / max(tn - head_time, 1e-9):.3f} (block evaluations alone: "
          f"{a.block_evaluations / b.block_evaluations:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
