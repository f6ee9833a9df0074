"""Merging by layer on SmolLM2: base, two fine-tunes, and every merge method x layer scheme in one table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/merge.py [--methods task_arithmetic,ties,dare_ties]
        [--schemes uniform,lines,importance,importance_scores,adamerging] [--mergekit /work/venv-mergekit]

Tasks (bench/merge_tasks.py): a Shakespeare LM adaptation and a VADER sentiment instruction model, each a
short full fine-tune of SmolLM2-135M-Instruct (cached in --cache). Columns: Shakespeare held-out
perplexity, VADER held-out accuracy, Wikipedia held-out perplexity (retention), and the normalised
average  ½·(ppl_FT-shakespeare / ppl) + ½·(acc / acc_FT-vader)  (1.0 = each fine-tune on its own task).
Coefficients are the defaults, fixed before looking at any result: λ = 1 per task; LiNeS α by the
reference rule, β = λ − α; importance with λ = 1; AdaMerging starts at λ = 1.

With --mergekit VENV, every merge whose recipe is exact is rebuilt by `mergekit-yaml` (CPU, no lazy
unpickle, safetensors) and compared tensor by tensor (max |difference|). Evaluations are cached in
--cache/evals.json, so several processes may run disjoint --methods and a last run prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import merge_tasks as MT  # noqa: E402

SCHEMES = ("uniform", "lines", "importance", "importance_scores", "adamerging")


def _evals_file(cache: Path) -> Path:
    return cache / "evals.json"


def load_evals(cache: Path) -> dict:
    f = _evals_file(cache)
    return json.loads(f.read_text()) if f.exists() else {}


def save_eval(cache: Path, key: str, value: dict) -> None:
    import fcntl

    with open(cache / "evals.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load_evals(cache)
        data[key] = value
        tmp = _evals_file(cache).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(_evals_file(cache))


def evaluate_dir(path, args) -> dict:
    from layerscope.model.loading import load_model

    lm = load_model(str(path))
    t = time.time()
    res = MT.evaluate(lm.model, lm.tokenizer, args.tokens, args.vader)
    res["eval_seconds"] = time.time() - t
    return res


def mergekit_compare(out: Path, venv: Path, work: Path) -> dict:
    """Run mergekit-yaml on out/mergekit.yaml and compare every tensor with layerscope's merged model."""
    import torch
    from safetensors.torch import load_file

    mk_out = work / (out.name + "-mergekit")
    shutil.rmtree(mk_out, ignore_errors=True)
    t = time.time()
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(out / "mergekit.yaml"), str(mk_out), "--no-lazy-unpickle",
           "--safe-serialization", "--random-seed", "0", "--no-copy-tokenizer"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if run.returncode != 0:
        return {"error": (run.stderr or run.stdout).strip().splitlines()[-1:]}
    ours = {}
    for f in out.glob("*.safetensors"):
        ours.update(load_file(str(f)))
    theirs = {}
    for f in mk_out.glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    diffs = {k: float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours if k in theirs}
    shutil.rmtree(mk_out, ignore_errors=True)
    worst = max(diffs, key=diffs.get)
    return {"max_abs_diff": diffs[worst], "worst_tensor": worst, "tensors_compared": len(diffs),
            "only_layerscope": sorted(set(ours) - set(theirs)), "only_mergekit": sorted(set(theirs) - set(ours)),
            "seconds": time.time() - t}


def run_merge(method: str, scheme: str, fts: dict, args, scores: dict) -> dict:
    import layerscope

    name = f"{method}-{scheme}"
    out = args.cache / "merged" / name
    shutil.rmtree(out, ignore_errors=True)
    srcs = [{"model": str(fts["shakespeare"]), "data": "shakespeare", "entropy": "all"},
            {"model": str(fts["vader"]), "data": str(args.cache / "vader_prompts.jsonl"), "entropy": "last"}]
    req: dict = dict(method=method, lambdas=[1.0, 1.0], density=0.5, seed=0)
    if scheme == "importance_scores":
        req.update(layers="importance", importance="scores", by=args.by)
        for s in srcs:
            s["scores"] = str(scores[Path(s["model"]).name])
    elif scheme == "adamerging":
        req.update(layers="adamerging", steps=args.ada_steps, lr=args.ada_lr, patience=2, tokens=512, seq_len=64,
                   batch=4)
    else:
        req.update(layers=scheme)
    t = time.time()
    res = layerscope.merge("smollm2", srcs, out=out, **req)
    row = {"merge_seconds": time.time() - t, "mergekit_exact": res.record["mergekit"]["exact"],
           "mergekit_reasons": res.record["mergekit"]["reasons"], "details": {
               k: v for k, v in res.record["plan"]["details"].items() if k in ("alpha", "beta", "stopped", "steps_run",
                                                                               "best_heldout_entropy", "columns")}}
    row["coefficients"] = res.record["plan"]["coefficients"]
    row.update(evaluate_dir(out, args))
    save_eval(args.cache, name, row)  # the metrics count even if mergekit fails or is slow
    if args.mergekit and name in args.mergekit_for.split(","):
        row["mergekit"] = mergekit_compare(out, args.mergekit, args.cache)
    shutil.rmtree(out, ignore_errors=True)
    return row


def score_tables(fts: dict, args) -> dict:
    """Each fine-tuned model scanned with --by's metric on its own task's calibration data (cached)."""
    import layerscope
    from layerscope.model.loading import load_model

    out = {}
    for task, path in fts.items():
        f = args.cache / f"scores-{path.name}-{args.by}.json"
        if not f.exists():
            lm = load_model(str(path))
            data = "shakespeare" if task == "shakespeare" else str(args.cache / "vader_prompts.jsonl")
            metric = args.by.split("@")[0]
            metric = {"ablation_dloss": "ablation", "ablation_kl": "ablation"}.get(metric, metric)
            table = layerscope.scan(lm.model, data, [metric], tokenizer=lm.tokenizer, tokens=1024, seq_len=128)
            table.to_json(f)
        out[path.name] = f
    return out


def norm_avg(row: dict, ft: dict) -> float:
    return 0.5 * ft["shakespeare"]["shakespeare_ppl"] / row["shakespeare_ppl"] + 0.5 * row["vader_acc"] / ft["vader"]["vader_acc"]


def print_table(evals: dict, fts: dict, methods, schemes) -> None:
    ft = {t: evals.get(f"ft-{p.name}") for t, p in fts.items()}
    rows = [("base (SmolLM2-135M-Instruct)", evals.get("base"))] + [(f"fine-tuned: {t}", ft[t]) for t in fts]
    rows += [(f"{m} × {s}", evals.get(f"{m}-{s}")) for m in methods for s in schemes]
    print("\n| model | Shakespeare ppl ↓ | VADER acc ↑ | Wikipedia ppl ↓ | normalised avg ↑ | mergekit max abs diff |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        if r is None:
            print(f"| {label} | – | – | – | – | not run |")
            continue
        na = f"{norm_avg(r, ft):.4f}" if all(ft.values()) else "–"
        mk = r.get("mergekit") or {}
        mks = (f"{mk['max_abs_diff']:.2e}" if "max_abs_diff" in mk else f"error: {mk.get('error')}" if mk else
               ("exact recipe, not compared" if r.get("mergekit_exact") else "–"))
        print(f"| {label} | {r['shakespeare_ppl']:.3f} | {r['vader_acc']:.4f} | {r['wiki_ppl']:.3f} | {na} | {mks} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=MT.CACHE)
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens for each perplexity")
    ap.add_argument("--vader", type=int, default=128, help="held-out VADER sentences")
    ap.add_argument("--by", default="taylor", help="importance_scores: ScoreTable column")
    ap.add_argument("--ada-steps", type=int, default=6)
    ap.add_argument("--ada-lr", type=float, default=0.05)
    ap.add_argument("--mergekit", type=Path, default=None, help="venv with mergekit (bin/mergekit-yaml)")
    ap.add_argument("--mergekit-for", default="task_arithmetic-uniform,task_arithmetic-lines,task_arithmetic-importance,"
                    "task_arithmetic-importance_scores,task_arithmetic-adamerging,ties-importance,dare_ties-uniform",
                    help="which merges mergekit rebuilds (each takes minutes on a busy CPU)")
    ap.add_argument("--no-reference", action="store_true", help="skip base / fine-tuned evaluations (another run does them)")
    ap.add_argument("--table-only", action="store_true", help="print the table from cached evaluations")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    methods, schemes = args.methods.split(","), args.schemes.split(",")
    args.cache.mkdir(parents=True, exist_ok=True)
    fts = {"shakespeare": MT.finetune("shakespeare", batch=4, cache=args.cache),
           "vader": MT.finetune("vader", batch=8, cache=args.cache)}
    if args.table_only:
        print_table(load_evals(args.cache), fts, methods, schemes)
        return 0
    prompts = args.cache / "vader_prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in MT.vader_prompts("calibration", 512)))
    if not args.no_reference and "base" not in load_evals(args.cache):
        from layerscope.model.loading import resolve

        save_eval(args.cache, "base", evaluate_dir(resolve("smollm2")[1], args))
    for p in fts.values():
        if not args.no_reference and f"ft-{p.name}" not in load_evals(args.cache):
            save_eval(args.cache, f"ft-{p.name}", evaluate_dir(p, args))
    scores = score_tables(fts, args) if "importance_scores" in schemes else {}
    for m in methods:
        for s in schemes:
            if f"{m}-{s}" in load_evals(args.cache):
                continue
            print(f"== {m} × {s}", flush=True)
            save_eval(args.cache, f"{m}-{s}", run_merge(m, s, fts, args, scores))
    print_table(load_evals(args.cache), fts, methods, schemes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
