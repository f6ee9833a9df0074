"""The same layer-wise probe run locally and with `--ray` on a local Ray cluster.

Prints whether the two results are identical (same JSON apart from the timings and the creation
stamp) and the wall-time ratio ray / local measured in this one run, for the whole call and for the
probe-fitting stage alone (the part Ray fans out: every (concept, pooling, layer) fit is one task;
the features are collected on the driver in both runs). The Ray time includes starting the
cluster's workers (cold: each imports torch and sklearn and receives the features once).

    OMP_NUM_THREADS=1 python bench/ray_probe.py [--model smollm2] [--n 2000] [--workers 2]
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=2000, help="VADER sentences (both built-in concepts)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import torch

    from layerscope.analysis.probes import probe
    from layerscope.engine.ray_pool import connect
    from layerscope.model.subject import load_subject

    torch.set_num_threads(1)  # the workers compute with the caller's thread count
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); 2 shared cores: timings are noisy")
    subject = load_subject(args.model)

    t0 = time.perf_counter()
    local = probe(subject, n=args.n, seed=0).to_dict()
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    connect("local", num_cpus=args.workers)
    t_init = time.perf_counter() - t0
    remote = probe(subject, n=args.n, seed=0, ray="local").to_dict()
    t_ray = time.perf_counter() - t0

    print(f"\nmodel {subject.model_id}, {subject.num_layers + 1} probed layers, n = {args.n}, "
          f"concepts {', '.join(local['concepts'])}")
    for name, c in local["concepts"].items():
        for p, r in c["poolings"].items():
            rr = remote["concepts"][name]["poolings"][p]
            print(f"  {name} [{p}]: best {r['best_accuracy']:.3f} at layer {r['best_layer']}, depth {r['depth']} "
                  f"| ray: best {rr['best_accuracy']:.3f} at layer {rr['best_layer']}, depth {rr['depth']}")
    fit_local, fit_ray = local["timings_s"]["probes"], remote["timings_s"]["probes"]
    for d in (local, remote):
        d.pop("timings_s"), d.pop("created")
    print(f"\nidentical JSON (apart from timings / created): {'yes' if local == remote else 'no'}")
    print(f"probe fits: local {fit_local:.1f} s, ray ({args.workers} local workers) {fit_ray:.1f} s; "
          f"ratio ray / local = {fit_ray / fit_local:.2f}")
    print(f"whole call: local {t_local:.1f} s, ray {t_ray:.1f} s (of which ray.init {t_init:.1f} s); "
          f"ratio ray / local = {t_ray / t_local:.2f}")


if __name__ == "__main__":
    main()
