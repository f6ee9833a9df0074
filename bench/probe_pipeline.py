"""Wall time of the layer-wise probe pipeline: 2,000 VADER sentences through SmolLM2 (or another model).

    .venv/bin/python bench/probe_pipeline.py [--model smollm2] [--n 2000] [--threads 1] [--precision auto]
                                             [--json out.json]

Stages timed separately: model load, sampling, feature collection (one forward pass per batch,
all 31 residual layers pooled two ways), probe fitting (per concept: layers x poolings x
{probe, shuffled-label control}, each with 3-fold CV over 4 values of C).  The machine's load
average is printed before and after, because a shared machine changes these numbers a lot.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a busy 2-core box two threads were 6x slower; 0 = torch's choice)")
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--json", default=None, help="also write the probe result JSON here")
    args = ap.parse_args()

    import torch

    from layerscope.data import assets
    from layerscope.analysis.features import collect_features
    from layerscope.data.labelled import concept_data, sentiment_sample
    from layerscope.model.subject import load_subject
    from layerscope.analysis.probes import probe_concept

    for name in ("sentiment",) + ((args.model,) if args.model in ("smollm2", "minilm") else ()):
        if not assets.is_ready(name):
            print(f"asset '{name}' is not prepared: run `layerscope assets fetch` first", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    t = time.perf_counter()
    subject = load_subject(args.model)
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    sample = sentiment_sample(args.n, 0)
    datasets = [concept_data(c, sample) for c in ("sentiment", "source")]
    t_sample = time.perf_counter() - t
    feats = collect_features(subject, datasets[0].texts, precision=args.precision)
    t_probe = {}
    results = {}
    for ds in datasets:
        t = time.perf_counter()
        results[ds.name] = probe_concept(feats, ds, seed=0)
        t_probe[ds.name] = time.perf_counter() - t
    total = time.perf_counter() - t_all
    load_after = os.getloadavg()

    L = subject.num_layers
    print(f"model {subject.model_id} ({subject.parts.family}, {L} blocks -> {L + 1} probed layers), "
          f"{len(sample)} sentences, {feats.n_tokens} tokens, precision {feats.precision}")
    print(f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch threads "
          f"{torch.get_num_threads()}, load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"  model load          {t_load:8.1f} s")
    print(f"  sampling            {t_sample:8.1f} s")
    print(f"  features (forward)  {feats.wall_time_s:8.1f} s  ({feats.n_tokens / feats.wall_time_s:.0f} tokens/s)")
    for name, v in t_probe.items():
        n_fits = len(feats.pooled) * (L + 1) * 2
        print(f"  probes: {name:<11} {v:8.1f} s  ({n_fits} probe fits with CV)")
    print(f"  total               {total:8.1f} s")
    for name, r in results.items():
        for p, pr in r.poolings.items():
            print(f"  {name} [{p}]: best {pr.best_accuracy:.3f} at layer {pr.best_layer}, depth {pr.depth}, "
                  f"control mean {sum(pr.control) / len(pr.control):.3f}")
    if args.json:
        import json

        from layerscope.outputs import write_text_atomic
        from layerscope.analysis.probes import ProbeResult, _jsonable
        from layerscope.model.subject import layer_names

        res = ProbeResult(model_id=subject.model_id, model_family=subject.parts.family,
                          weights_sha256=subject.weights_sha256, num_layers=L, layer_names=layer_names(L),
                          concepts=results, options={"n": args.n, "precision": feats.precision},
                          timings={"features": feats.wall_time_s, **{f"probes_{k}": v for k, v in t_probe.items()},
                                   "total": total})
        write_text_atomic(args.json, json.dumps(_jsonable(res.to_dict()), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
