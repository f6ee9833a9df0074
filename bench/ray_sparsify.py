"""The same `sparsify` run locally and with `--ray` on a local Ray cluster.

Prints the plan's numbers of both runs, whether they are identical (same JSON apart from the output
directory and creation stamp, same saved weights) and the wall-time ratio ray / local measured in this
one run. What Ray fans out: the exact allocator's loss curves (blocks dealt out to the workers), the
plan and the uniform plan pruned side by side with their selection perplexities, and the dense and
shipped model's held-out perplexities. The Ray time includes starting the cluster's workers (cold: each
imports torch and receives the model once).

    OMP_NUM_THREADS=1 python bench/ray_sparsify.py [--model smollm2] [--sparsity 0.5] [--method wanda]
        [--tokens 512] [--seq-len 128] [--eval-tokens 1024] [--workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _run(args, out: Path, ray: str | None) -> tuple[dict, float]:
    """One sparsify run; returns its result (without the output directory and stamp) and its wall time."""
    from layerscope.actions.sparsify import sparsify

    t0 = time.perf_counter()
    d = sparsify(args.model, out=out, sparsity=args.sparsity, method=args.method, allocation=args.allocation,
                 tokens=args.tokens, seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                 select_tokens=args.select_tokens, exact_loss_tokens=args.seq_len, ray=ray).to_dict()
    wall = time.perf_counter() - t0
    d.pop("out"), d["plan"]["provenance"].pop("created")
    return d, wall


def _same_weights(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    return bool(files) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--allocation", default="exact")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--select-tokens", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import torch

    from layerscope.engine.ray_pool import connect

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); 2 shared cores: timings are noisy")
    tmp = Path(tempfile.mkdtemp(prefix="ray_sparsify_"))
    local, t_local = _run(args, tmp / "local", None)
    t0 = time.perf_counter()
    connect("local", num_cpus=args.workers)
    t_init = time.perf_counter() - t0
    remote, t_ray = _run(args, tmp / "ray", "local")
    t_ray += t_init

    p = local["plan"]
    print(f"\nmodel {args.model}, {args.method} {args.allocation} at {args.sparsity}, {args.tokens} calibration tokens, "
          f"shipped {local.get('shipped', p['allocation'])}; levels {' '.join(f'{x:.2f}' for x in p['levels'])}")
    for name, d in (("local", local), ("ray", remote)):
        sel = d.get("selection") or {}
        print(f"{name:<6} selection ppl plan {sel.get('plan_perplexity', float('nan')):.4f} uniform "
              f"{sel.get('uniform_perplexity', float('nan')):.4f}; measured loss {d['measured_loss']:.5f}; "
              + ", ".join(f"{e['name']} {e['perplexity']:.4f}" for e in d["evaluations"]))
    print(f"\nidentical JSON (apart from out dir / created): {local == remote}; identical saved weights: "
          f"{_same_weights(tmp / 'local' / 'model', tmp / 'ray' / 'model')}")
    print(f"wall time: local {t_local:.1f} s, ray ({args.workers} local workers) {t_ray:.1f} s "
          f"(of which ray.init {t_init:.1f} s); ratio ray / local = {t_ray / t_local:.2f}")


if __name__ == "__main__":
    main()
