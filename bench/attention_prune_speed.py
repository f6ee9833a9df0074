"""Bench: remove 25 % of SmolLM2's attention sublayers (8 of 30) by a metric; perplexity and speed-up.

`layerscope prune --unit attention` writes a directory whose pruned attention output projections
are zero, so plain transformers computes the pruned network but still runs those attentions;
`layerscope.load` skips them. This prints the held-out perplexity (unpruned, plain-loaded pruned
directory, fast path) and the forward time of plain vs fast on the same tokens: repeats are
interleaved (plain, fast, plain, fast, ...) and the medians compared.

    .venv/bin/python bench/attention_prune_speed.py [--remove 8] [--by block_influence] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--by", default="block_influence", help="score column, ranked at unit 'attention'")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--scan-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1, help="sequences per timed forward")
    ap.add_argument("--seq", type=int, default=512, help="tokens per timed sequence")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    import transformers

    from layerscope.data import assets
    from layerscope import load
    from layerscope.actions.prune import prune
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity, token_stream
    from layerscope.model.loading import load_model

    if not assets.is_ready("smollm2") or not assets.is_ready("wikipedia"):
        print("SmolLM2 / Wikipedia assets are not prepared (layerscope assets fetch)")
        return 1
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    protocol = PerplexityProtocol(dataset="wikipedia", split="evaluation", context_length=args.context,
                                  stride=args.context, max_tokens=args.tokens, batch_size=4)
    base = load_model(None)
    ids = token_stream(base.tokenizer, protocol)
    base_ppl = perplexity(base.model, ids=ids, protocol=protocol).perplexity
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "smollm2-attn-pruned"
        t = time.perf_counter()
        res = prune(None, out=out, remove=args.remove, unit="attention", by=args.by,
                    scan_options={"tokens": args.scan_tokens})
        print(f"pruned attention sublayers {res.removed} of 30 by {res.provenance['selection']['by']} "
              f"({time.perf_counter() - t:.0f} s incl. scan of {args.scan_tokens} tokens); torch threads {args.threads}")
        plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        fast = load(out)
        ppl_plain = perplexity(plain, ids=ids, protocol=protocol).perplexity
        ppl_fast = perplexity(fast, ids=ids, protocol=protocol).perplexity
        print(f"held-out perplexity ({protocol.describe()}):")
        print(f"  unpruned                         {base_ppl:.4f}")
        print(f"  pruned, plain transformers       {ppl_plain:.4f}")
        print(f"  pruned, layerscope.load (fast)   {ppl_fast:.4f}   (relative difference {abs(ppl_fast - ppl_plain) / ppl_plain:.1e})")
        x = ids[: args.batch * args.seq].reshape(args.batch, args.seq)
        times: dict[str, list[float]] = {"unpruned": [], "plain": [], "fast": []}
        models = {"unpruned": base.model, "plain": plain, "fast": fast}
        with torch.no_grad():
            for m in models.values():  # warm-up
                m(input_ids=x, use_cache=False)
            for _ in range(args.repeats):
                for name, m in models.items():
                    t = time.perf_counter()
                    m(input_ids=x, use_cache=False)
                    times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"forward time on the same {args.batch}x{args.seq} tokens, median of {args.repeats} interleaved repeats:")
        for k, v in times.items():
            print(f"  {k:9s} {med[k] * 1000:8.1f} ms   (all: {', '.join(f'{s * 1000:.0f}' for s in v)})")
        print(f"speed-up of the fast path over plain transformers on the same pruned weights: "
              f"{med['plain'] / med['fast']:.3f}x  ({(1 - med['fast'] / med['plain']) * 100:.1f} % less time)")
        # the blocks alone (no embedding / LM head), where the skipped work lives
        tb: dict[str, list[float]] = {"plain": [], "fast": []}
        with torch.no_grad():
            for _ in range(args.repeats):
                for name, m in (("plain", plain), ("fast", fast)):
                    t = time.perf_counter()
                    m.model(input_ids=x, use_cache=False)
                    tb[name].append(time.perf_counter() - t)
        mb = {k: statistics.median(v) for k, v in tb.items()}
        print(f"decoder stack only (model.model, no LM head): plain {mb['plain'] * 1000:.1f} ms, fast "
              f"{mb['fast'] * 1000:.1f} ms, speed-up {mb['plain'] / mb['fast']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
