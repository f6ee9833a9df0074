"""Bench: fine-tuning SmolLM2-135M (30 blocks) by layer -- one table per task, every row at equal steps and tokens.

Rows: full fine-tuning, LoRA on all blocks, LoRA on the top-k / bottom-k / random-k blocks by the selection metric,
LISA uniform, LISA importance-weighted, IST, static freeze of the top-k blocks, and LMFlow-style LISA (state kept for
every block ever active; for the memory claim). Columns: held-out task metric (mean +- half-range over seeds),
held-out Wikipedia perplexity (forgetting), peak memory (RSS during training, each row in its own process),
optimizer-state bytes (peak) and time per step. The selection metric is relative_contribution: the previous
session's `layerscope agree` on SmolLM2 found it agrees best with ablation; its values here come from a quick
scan of the task's training text (`--scan-tokens`).

Then the memory claim: the optimizer state of LISA with gamma active blocks = gamma blocks + embeddings + head
(computed from the parameter sizes, and measured), against LMFlow-style LISA and full fine-tuning.

    OMP_NUM_THREADS=1 .venv/bin/python bench/finetune.py [--tasks sentiment,shakespeare] [--steps 40] [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [  # (label, method, extra plan fields, key row: run every seed)
    ("full FT", "full", {}, True),
    ("LoRA all", "lora-all", {}, True),
    ("LoRA top-k", "lora-selected", {"select": "top"}, True),
    ("LoRA bottom-k", "lora-selected", {"select": "bottom"}, False),
    ("LoRA random-k", "lora-selected", {"select": "random"}, False),
    ("LISA uniform", "lisa", {}, True),
    ("LISA importance", "lisa-importance", {}, True),
    ("IST", "ist", {}, True),
    ("freeze top-k", "freeze", {"select": "top"}, False),
    ("LISA LMFlow-style (state kept)", "lisa", {"trim_state": False}, False),
]


def run_row(plan_path: str, model: str) -> dict:
    """In a fresh process: load SmolLM2, fine-tune with the plan, evaluate; return the result dict."""
    from layerscope.actions.finetune.run import finetune
    from layerscope.plans.finetune import FinetunePlan

    plan = FinetunePlan.from_file(plan_path)
    res = finetune(model, plan, progress=False, baseline=False)  # the parent measured the baseline once
    return res.to_dict()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="sentiment,shakespeare")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--train-examples", type=int, default=512)
    ap.add_argument("--eval-examples", type=int, default=256, help="held-out sentences / windows")
    ap.add_argument("--wiki-tokens", type=int, default=4096)
    ap.add_argument("--k", type=int, default=8, help="blocks for LoRA top/bottom/random-k and freeze")
    ap.add_argument("--gamma", type=int, default=4, help="active blocks for LISA / IST")
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-5, help="full-parameter methods (full, LISA, IST, freeze)")
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--scan-tokens", type=int, default=2048)
    ap.add_argument("--rows", default="", help="comma list of row labels to run (default: all)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.row:
        print("ROWJSON " + json.dumps(run_row(args.row, args.model)), flush=True)
        return 0

    from layerscope.data.tasks import forgetting, task_metric
    from layerscope.model.subject import load_subject
    from layerscope.plans.finetune import block_scores

    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = {r.strip() for r in args.rows.split(",") if r.strip()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    report: dict = {"args": vars(args) | {"json": str(args.json)}, "tasks": {}}
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        subject = load_subject(args.model)
        model, tok = subject.model, subject.tokenizer
        common = dict(data=task, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      train_examples=args.train_examples, eval_examples=args.eval_examples,
                      forgetting_tokens=args.wiki_tokens, interval=args.interval)
        vals, direction, where = block_scores(model, tok, "relative_contribution", task, tokens=args.scan_tokens,
                                              seq_len=args.seq_len)
        scores_note = f"relative_contribution ({where})"
        from layerscope.data.tasks import task_dataset

        held = task_dataset(task, tok, "eval", n=args.eval_examples, seq_len=args.seq_len)
        base = {"task": task_metric(model, task, tok, data=held).to_dict(),
                "forgetting": forgetting(model, tok, tokens=args.wiki_tokens)}
        print(f"[{task}] baseline {base['task']['metric']} {base['task']['value']:.4f}, wiki ppl "
              f"{base['forgetting']['perplexity']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows = {}
        for label, method, extra, key in ROWS:
            if wanted and label not in wanted:
                continue
            for seed in (seeds if key else seeds[:1]):
                lr = args.lora_lr if method.startswith("lora") else args.lr
                n = args.k if method in ("lora-selected", "freeze") else args.gamma
                plan = _plan(model, tok, method, extra, common, lr, seed, n, vals, direction, where)
                path = tmp / f"{task}-{method}-{len(rows)}-{seed}.yaml"
                plan.save(path)
                t1 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--row", str(path), "--model", args.model], capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("ROWJSON ")]
                if proc.returncode != 0 or not line:
                    print(f"[{task}] {label} seed {seed} FAILED: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                d = json.loads(line[0][8:])
                rows.setdefault(label, []).append(d)
                c = d["costs"]
                print(f"[{task}] {label} seed {seed}: {d['task']['metric']} {d['task']['value']:.4f}, wiki ppl "
                      f"{d['forgetting']['perplexity']:.3f}, opt state {c['optimizer_state_bytes'] / 2**20:.1f} MiB, "
                      f"peak RSS {c['peak_memory_bytes'] / 2**20:.0f} MiB, {c['step_time_s']:.2f} s/step, blocks "
                      f"{d['plan'].get('layers') or ''} ({time.perf_counter() - t1:.0f} s)", flush=True)
        report["tasks"][task] = {"baseline": base, "rows": rows, "scores": scores_note, "values": vals}
        print_table(task, base, rows)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        del model, subject
    print_memory_claim(args.gamma, args.model)
    return 0


def _plan(model, tok, method, extra, common, lr, seed, n, vals, direction, where):
    """The row's plan, with the block ranking taken from the one scan of the task (not re-scanned per row)."""
    import numpy as np

    from layerscope.actions.finetune.lisa import importance_weights
    from layerscope.plans.finetune import FinetunePlan

    fields = {**common, **{k: v for k, v in extra.items() if k != "select"}, "lr": lr, "seed": seed, "n_layers": n}
    plan = FinetunePlan(method=method, **fields)
    w = importance_weights(values=vals, direction=direction, num_layers=len(vals))
    if method in ("lisa-importance", "lora-selected", "freeze"):
        plan.by, plan.weights = "relative_contribution", [round(float(x), 6) for x in w]
        plan.notes.append(f"block scores: {where}")
    if method in ("lora-selected", "freeze"):
        sel = extra.get("select", "top")
        plan.select = sel
        order = np.argsort(-w, kind="stable")
        if sel == "random":
            chosen = np.random.default_rng(seed).choice(len(w), n, replace=False)
        else:
            chosen = order[:n] if sel == "top" else order[::-1][:n]
        plan.layers = sorted(int(i) for i in chosen)
    return plan.check()


def _ms(xs):
    if not xs:
        return "n/a"
    m = statistics.mean(xs)
    return f"{m:.4f}" if len(xs) == 1 else f"{m:.4f} ± {(max(xs) - min(xs)) / 2:.4f}"


def print_table(task, base, rows):
    t = base["task"]
    better = "higher" if t["higher_is_better"] else "lower"
    print(f"\n## {task}: held-out {t['metric']} ({better} is better; before fine-tuning {t['value']:.4f}), "
          f"Wikipedia ppl before {base['forgetting']['perplexity']:.3f}")
    print("| row | seeds | task metric | Wikipedia ppl | peak RSS (MiB) | optimizer state (MiB) | s/step | blocks |")
    print("|---|---|---|---|---|---|---|---|")
    for label, ds in rows.items():
        c = [d["costs"] for d in ds]
        print(f"| {label} | {len(ds)} | {_ms([d['task']['value'] for d in ds])} | "
              f"{_ms([d['forgetting']['perplexity'] for d in ds])} | "
              f"{statistics.mean(x['peak_memory_bytes'] for x in c) / 2**20:.0f} | "
              f"{statistics.mean(x['optimizer_state_bytes'] for x in c) / 2**20:.1f} | "
              f"{statistics.mean(x['step_time_s'] for x in c):.2f} | {ds[0]['plan'].get('layers') or ''} |")
    print(flush=True)


def print_memory_claim(gamma: int, model: str) -> None:
    """Adam state (exp_avg + exp_avg_sq fp32 + a 4-byte step per tensor) for the parts LISA trains."""
    from layerscope.model.subject import load_subject

    m = load_subject(model).model
    per = lambda ps: sum(2 * p.numel() * 4 + 4 for p in ps)  # noqa: E731
    blocks = [per(list(b.parameters())) for b in m.model.layers]
    outside = per([p for n, p in m.named_parameters() if ".layers." not in n])
    L = len(blocks)
    print(f"## memory claim (Adam state, fp32): {L} blocks of {blocks[0] / 2**20:.1f} MiB each, embeddings + final "
          f"norm + head (tied) {outside / 2**20:.1f} MiB")
    lisa, full = gamma * blocks[0] + outside, sum(blocks) + outside
    print(f"  LISA, gamma={gamma} of {L}, state trimmed on every switch: {lisa} bytes ({lisa / 2**20:.1f} MiB)")
    print(f"  LMFlow-style LISA after every block has been active once, and full fine-tuning: {full} bytes "
          f"({full / 2**20:.1f} MiB); ratio {full / lisa:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
