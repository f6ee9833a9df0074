"""Scan overhead on SmolLM2: full default scan wall time / one bare forward pass over the same tokens,
and peak memory of the scan above the process baseline, compared with weights + 1 GiB.

Each measurement runs in a fresh subprocess so peak RSS belongs to one phase only.
Usage: python bench/scan_overhead.py [--tokens 2048 8192] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def phase(name: str, tokens: int, seq_len: int, batch_size: int) -> dict:
    import torch
    import transformers

    from layerscope.model.loading import load_model
    from layerscope.data.windows import prepare_tokens
    from layerscope.metrics.scan import scan

    transformers.utils.logging.disable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(str(__import__("layerscope.data.assets").data.assets.asset_dir("smollm2")))
    ids, _ = prepare_tokens(tok, "wikipedia", tokens, seq_len)
    base = rss_bytes()
    lm = load_model(None, tokenizer=False)
    model = lm.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = rss_bytes()
    t0 = time.perf_counter()
    if name == "bare":
        with torch.no_grad():
            for s in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[s:s + batch_size], use_cache=False)
    else:
        scan(model, ids, None, tokenizer=tok, batch_size=batch_size,
             options={"weights_cache": name == "scan_cached", "weights_sha256": lm.weights_sha256})
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"phase": name, "tokens": int(ids.numel()), "wall_s": wall, "weights_bytes": weights,
            "rss_baseline": base, "rss_loaded": loaded, "rss_peak": peak}


def run_phase(name: str, tokens: int, seq_len: int, batch_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--tokens", str(tokens), "--seq-len", str(seq_len),
                          "--batch-size", str(batch_size)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--phase")
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.tokens[0], args.seq_len, args.batch_size)))
        return
    gib = 1 << 30
    # Fill the weight-statistics cache once so the 'cached' runs measure the steady state.
    run_phase("scan_cached", args.tokens[0], args.seq_len, args.batch_size)
    print(f"{'tokens':>7} {'bare s':>8} {'scan s':>8} {'ratio':>6} {'scan(cold weights) s':>21} {'ratio':>6} "
          f"{'peak-baseline GiB':>18} {'weights+1GiB':>13} {'ok':>3}")
    for n in args.tokens:
        rows = {k: [] for k in ("bare", "scan_cached", "scan_cold")}
        for _ in range(args.repeats):
            for k in rows:  # interleaved, so background load affects all phases alike
                rows[k].append(run_phase(k, n, args.seq_len, args.batch_size))
        best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in rows.items()}
        bare, hot, cold = best["bare"], best["scan_cached"], best["scan_cold"]
        peak = max(r["rss_peak"] - r["rss_baseline"] for r in rows["scan_cold"] + rows["scan_cached"])
        target = bare["weights_bytes"] + gib
        print(f"{bare['tokens']:>7} {bare['wall_s']:>8.2f} {hot['wall_s']:>8.2f} {hot['wall_s'] / bare['wall_s']:>6.2f} "
              f"{cold['wall_s']:>21.2f} {cold['wall_s'] / bare['wall_s']:>6.2f} {peak / gib:>18.3f} "
              f"{target / gib:>13.3f} {'yes' if peak <= target else 'NO':>3}")
    print("ratio target <= 1.5 (scan / one bare forward over the same tokens); "
          "memory target: scan peak RSS above the pre-load baseline <= weights + 1 GiB")


if __name__ == "__main__":
    main()
