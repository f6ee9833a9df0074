"""Cost of the statistics pass (engine/moments.py) relative to one bare block-sequential forward.

Both run through the engine over the same calibration windows, in one process, alternating
(bare, stats, bare, stats, ...); time is wall clock, memory the peak RSS of each run above the RSS at its
start (VmHWM reset through /proc/self/clear_refs before it; the last repeat, once the weights are paged in). The stats pass collects XᵀX of every nn.Linear of each
block (float32 products accumulated in float64), non-sequential and sequential (which runs each
block twice); on_block does nothing.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/moments.py --calib 8x128
"""
from __future__ import annotations

import argparse
import time


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])  # kB
    raise RuntimeError(key)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib", default="8x128")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch

    from layerscope.compress.blockwise import calibration_windows
    from layerscope.engine.moments import linear_moments
    from layerscope.engine.runner import BlockRunner, make_batches
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model

    n_seq, seq_len = (int(x) for x in args.calib.split("x"))
    lm = load_model(args.model)
    parts = find_parts(lm.model)
    ids = calibration_windows(lm.tokenizer, n_seq * seq_len, seq_len)
    batches, _ = make_batches(ids, 4)

    def bare():
        r = BlockRunner(parts, batches)
        with torch.no_grad():
            r.blockwise()

    def stats(sequential):
        return lambda: linear_moments(parts, batches, on_block=lambda i, b, s: None, sequential=sequential)

    runs = {"bare forward (engine)": bare, "stats pass, non-sequential": stats(False),
            "stats pass, sequential": stats(True)}
    res: dict[str, list[tuple[float, int]]] = {k: [] for k in runs}
    base_rss = _status("VmRSS")
    for _ in range(args.repeats):
        for name, fn in runs.items():
            _reset_peak()
            start = _status("VmRSS")
            t = time.perf_counter()
            fn()
            res[name].append((time.perf_counter() - t, _status("VmHWM") - start))
    print(f"# {lm.model_id}, {ids.numel()} calibration tokens ({n_seq}x{seq_len}), batches of 4, "
          f"torch threads {torch.get_num_threads()}; RSS before the runs {base_rss / 1024:.0f} MB")
    print("| run | time s (best) | ÷ bare | peak RSS above the RSS at its start (MB, last repeat) | ÷ bare |")
    print("|---|---|---|---|---|")
    # the first repeat pages the (memory-mapped) weights in: memory from the last repeat, time the best
    b_t = min(t for t, _ in res["bare forward (engine)"])
    b_m = res["bare forward (engine)"][-1][1]
    for name, vals in res.items():
        t = min(v[0] for v in vals)
        m = vals[-1][1]
        print(f"| {name} | {t:.1f} | {t / b_t:.2f} | {m / 1024:.0f} | {m / b_m if b_m > 0 else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
