"""Bench: leave-one-out block ablation, prefix reuse vs naive full reruns, on SmolLM2-135M or Gemma-3-270M.

Prefix reuse (`layerscope.metrics.ground_truth.ablation.leave_one_out`): capture the first block's
inputs, one full pass caching every block's input, then "skip block i" = blocks i+1..L-1 + head from
the cached input of block i, scored with the vocabulary-bounded scorer (evaluation/scoring.py).

Naive: for every block, one full forward of the model through plain transformers
(`model(input_ids).logits`) with that block removed by the project's one removal primitive
(`engine.removal.blocks_removed`: drops the block, renumbers layer_idx, subsets layer_types -- needed
for Gemma 2/3 and Qwen 2/3), scored with the plain full-tensor formula (log_softmax over
[tokens x vocab], reference log-probabilities kept): the same KL(full || ablated) and ablated NLL.

Each method runs in its own child process (so its peak RSS, ru_maxrss, is its own), alternating
for --repeats rounds; the fastest round of each is compared. Prints, in one run: the per-block
numbers, the max relative difference, the wall-time ratio prefix / naive (target <= 0.55), the same
ratio against the naive run's forward passes alone (its scoring time excluded: a lower bound for
any naive loop), and the peak RSS of each method against the weights' size (target <= weights + 1.5 GiB).

    python bench/ablation.py --model gemma3|smollm2 [--tokens 512] [--seq-len 512] [--repeats 1] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 1 << 30


def child(args) -> dict:
    import torch
    import torch.nn.functional as F

    from layerscope.data.sources import load_texts
    from layerscope.data.windows import tokenize_windows
    from layerscope.engine.removal import blocks_removed
    from layerscope.engine.runner import BlockRunner, make_batches
    from layerscope.metrics.ground_truth.ablation import leave_one_out
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    model = lm.model.eval()
    parts = find_parts(model)
    L = parts.num_layers
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # loading alone (model/loading.py)
    ids = tokenize_windows(lm.tokenizer, load_texts("wikipedia", split="evaluation"), n_tokens=args.tokens,
                           seq_len=args.seq_len)
    batches, _ = make_batches(ids, args.batch_size)
    out = {"method": args.method, "blocks": L, "weights_bytes": weights, "tokens": int(ids.numel()),
           "windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "vocab": int(parts.head.weight.shape[0]),
           "family": model.config.model_type, "torch": torch.__version__, "load_peak_rss": load_peak}
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if args.method == "prefix":
        runner = BlockRunner(parts, [dict(b) for b in batches])
        runner.capture()  # counted: the naive path does not need it
        res = leave_one_out(runner, units=("block",))
        kl, nll, base, n = res.kl("block"), res.nll("block"), res.base_nll, res.positions
        out["forward_s"] = None
    else:
        kl_s, nll_s, base_s, n, fwd = [0.0] * L, [0.0] * L, 0.0, 0, 0.0
        with torch.no_grad():
            for b in batches:
                x = b["input_ids"]
                tgt = x[:, 1:, None]
                t1 = time.perf_counter()
                ref = model(input_ids=x, use_cache=False).logits
                fwd += time.perf_counter() - t1
                logp = F.log_softmax(ref[:, :-1].float(), -1)
                del ref
                p = logp.exp()
                base_s += float(-logp.gather(-1, tgt).double().sum())
                n += int(tgt.numel())
                for i in range(L):
                    t1 = time.perf_counter()
                    with blocks_removed(model, [i]):
                        logits = model(input_ids=x, use_cache=False).logits
                    fwd += time.perf_counter() - t1
                    logq = F.log_softmax(logits[:, :-1].float(), -1)
                    del logits
                    kl_s[i] += float((p * (logp - logq)).sum(-1).double().sum())
                    nll_s[i] += float(-logq.gather(-1, tgt).double().sum())
                    del logq
        kl, nll, base = [v / n for v in kl_s], [v / n for v in nll_s], base_s / n
        out["forward_s"] = fwd
    out["wall_s"] = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out["user_s"], out["sys_s"] = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
    out.update(kl=kl, nll=nll, base_nll=base, positions=n,
               peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


def run_child(args, method: str) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--tokens", str(args.tokens),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{method} child failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--tokens", type=int, default=512, help="held-out Wikipedia tokens (evaluation split)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1, help="windows per batch")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds of each method (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--child", choices=("prefix", "naive"))
    args = ap.parse_args()
    if args.child:
        args.method = args.child
        print(json.dumps(child(args)))
        return 0

    from layerscope.data import assets

    if not assets.is_ready(args.model) or not assets.is_ready("wikipedia"):
        print(f"{args.model} / Wikipedia assets are not prepared: run `layerscope assets fetch` first", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {"prefix": [], "naive": []}
    for r in range(args.repeats):
        for name in runs:
            runs[name].append(run_child(args, name))
            x = runs[name][-1]
            if r == 0 and name == "prefix":
                print(f"{args.model} ({x['family']}): {x['blocks']} blocks, vocabulary {x['vocab']}, weights "
                      f"{x['weights_bytes'] / GIB:.3f} GiB; {x['tokens']} held-out Wikipedia tokens in {x['windows']} "
                      f"window(s) of {x['seq_len']}, batch {args.batch_size}, torch {x['torch']}, "
                      f"{args.threads} thread(s), each method in its own process", flush=True)
            print(f"  round {r + 1}: {name:6s} wall {x['wall_s']:8.1f} s, CPU user {x['user_s']:7.1f} s + system "
                  f"{x['sys_s']:6.1f} s, peak RSS {x['peak_rss'] / GIB:.3f} GiB", flush=True)
    a = min(runs["prefix"], key=lambda d: d["wall_s"])
    b = min(runs["naive"], key=lambda d: d["wall_s"])
    L = a["blocks"]
    dl_a = [v - a["base_nll"] for v in a["nll"]]
    dl_b = [v - b["base_nll"] for v in b["nll"]]

    def rel(x, y):
        return max(abs(p - q) / max(abs(q), 1e-30) for p, q in zip(x, y))

    print("\nblock  ablation_kl(prefix)  ablation_kl(naive)  dloss(prefix)  dloss(naive)")
    for i in range(L):
        print(f"{i:5d}  {a['kl'][i]:19.6g}  {b['kl'][i]:18.6g}  {dl_a[i]:13.6g}  {dl_b[i]:12.6g}")
    print(f"\nbase NLL: prefix {a['base_nll']:.6f}, naive {b['base_nll']:.6f}; positions {a['positions']}")
    d_kl, d_nll = rel(a["kl"], b["kl"]), rel(a["nll"], b["nll"])
    d_dl = max(abs(p - q) for p, q in zip(dl_a, dl_b)) / max(abs(v) for v in dl_b)
    worst = max(d_kl, d_nll, d_dl)
    print(f"max relative difference per block: KL {d_kl:.3g}, ablated NLL {d_nll:.3g}, dloss {d_dl:.3g} "
          f"(relative to max |dloss|) -> {worst:.3g}  (target <= 1e-4: {'PASS' if worst <= 1e-4 else 'FAIL'})")
    tp, tn, tf = a["wall_s"], b["wall_s"], b["forward_s"]
    ratio = tp / tn
    print(f"wall time (fastest of {args.repeats}): prefix {tp:.1f} s, naive {tn:.1f} s "
          f"(of which its {L + 1} forwards per batch {tf:.1f} s, full-tensor scoring {tn - tf:.1f} s)")
    print(f"wall-time ratio prefix / naive: {ratio:.3f}  (target <= 0.55: {'PASS' if ratio <= 0.55 else 'FAIL'})")
    print(f"wall-time ratio prefix / naive forwards alone (naive scoring excluded): {tp / tf:.3f}  "
          f"(target <= 0.55: {'PASS' if tp / tf <= 0.55 else 'FAIL'})")
    cpu_a, cpu_b = a["user_s"] + a["sys_s"], b["user_s"] + b["sys_s"]
    print(f"CPU-time ratio prefix / naive (user+system of each process; robust to load from other processes, "
          f"single-threaded so CPU time ~ wall time on an idle machine): {cpu_a / cpu_b:.3f}  "
          f"(target <= 0.55: {'PASS' if cpu_a / cpu_b <= 0.55 else 'FAIL'}); system time: prefix {a['sys_s']:.1f} s, "
          f"naive {b['sys_s']:.1f} s")
    w = a["weights_bytes"]
    for name, x in (("prefix", a), ("naive", b)):
        peak = max(d["peak_rss"] for d in runs[name])
        ok = peak <= w + 1.5 * GIB
        load = max(d.get("load_peak_rss", 0) for d in runs[name])
        print(f"peak RSS {name:6s}: {peak / GIB:.3f} GiB = weights {w / GIB:.3f} GiB + {(peak - w) / GIB:.3f} GiB  "
              f"(target <= weights + 1.5 GiB: {'PASS' if ok else 'FAIL'}); peak while loading the model alone: "
              f"{load / GIB:.3f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
