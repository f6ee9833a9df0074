"""Out-of-core scan and quantize: a synthetic Llama whose weights exceed the memory it may use.

1. Writes a randomly initialised Llama (fp32, >= --gb GB) as sharded safetensors, one shard per block,
   generating one block at a time (the whole model is never in RAM), with SmolLM2's tokenizer.
2. Runs `layerscope scan` on it (default metrics, weight statistics included) inside a cgroup v1
   memory limit of HALF the weights' size, and prints peak RSS / weights size and the wall time.
3. `--quantize-gb G`: writes a second synthetic Llama of >= G GB with GPTQ-friendly widths (hidden
   2048, MLP 5632: every Hessian fits; step 1's MLP of 65,536 would need a 34 GB one) and runs
   `layerscope quantize --by uniform --method gptq` on it under half its size: GPTQ, packing,
   writing and the held-out evaluation one block at a time. Prints peak RSS / weights, wall time,
   the perplexities and the read-back check.
4. On SmolLM2, runs `layerscope scan --offload` and `--no-offload` and prints the largest difference
   between the two scores.json files (expected: 0.0, identical values); with --quantize-gb, also
   `quantize --method gptq --by uniform` both ways: every saved tensor and the perplexities compared.

The shape has few, wide blocks with a narrow residual stream (hidden 512, MLP 65536): it keeps the
forward pass and the weight statistics (whose cost grows with the smaller side of each matrix)
cheap on 2 shared cores while every block still holds ~400 MB. Needs root and the cgroup v1 memory
controller (/sys/fs/cgroup/memory); step 2 is skipped with a message where they are missing.

    OMP_NUM_THREADS=1 python bench/out_of_core.py [--gb 8] [--tokens 512] [--quantize-gb 4] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, HEADS, INTER = 512, 8, 65536
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


QUANT_SHAPE = (2048, 16, 5632)  # hidden, heads, MLP: TinyLlama's widths


def block_params(hidden: int = HIDDEN, inter: int = INTER) -> int:
    return 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden


def write_model(dest: Path, gb: float, seed: int = 0, shape: tuple[int, int, int] = (HIDDEN, HEADS, INTER)
                ) -> tuple[int, int]:
    """Write the synthetic model; returns (layers, bytes of weights)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from layerscope.data import assets

    HIDDEN, HEADS, INTER = shape  # noqa: N806 (the module's default shape, or the quantize one)
    tok_dir = assets.asset_dir("smollm2")
    vocab = 49152
    layers = math.ceil((gb * 1e9 / 4 - 2 * vocab * HIDDEN) / block_params(HIDDEN, INTER))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="float32")
    dest.mkdir(parents=True)
    cfg.save_pretrained(dest)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(f, dest / f.name)
    g = torch.Generator().manual_seed(seed)
    index: dict[str, str] = {}
    total = 0

    def put(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(dest / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            index[k] = name
            total += v.numel() * v.element_size()

    def rnd(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    put("embed.safetensors", {"model.embed_tokens.weight": torch.randn(vocab, HIDDEN, generator=g) * 0.02,
                              "model.norm.weight": torch.ones(HIDDEN), "lm_head.weight": rnd(vocab, HIDDEN)})
    for i in range(layers):
        p = f"model.layers.{i}."
        put(f"block-{i:03d}.safetensors", {
            p + "input_layernorm.weight": torch.ones(HIDDEN), p + "post_attention_layernorm.weight": torch.ones(HIDDEN),
            **{p + f"self_attn.{n}.weight": rnd(HIDDEN, HIDDEN) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            p + "mlp.gate_proj.weight": rnd(INTER, HIDDEN), p + "mlp.up_proj.weight": rnd(INTER, HIDDEN),
            p + "mlp.down_proj.weight": rnd(HIDDEN, INTER)})
    (dest / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    return layers, total


def layerscope_cmd() -> list[str]:
    """`layerscope` run by this interpreter (so PYTHONPATH picks the source tree)."""
    return [sys.executable, "-m", "layerscope.cli.app"]


def cgroup_run(cmd: list[str], limit: int, env: dict) -> dict:
    """Run cmd inside a fresh cgroup v1 memory cgroup with `limit` bytes; report peak usage and time."""
    name = CGROUP_ROOT / f"layerscope-ooc-{os.getpid()}"
    name.mkdir()
    try:
        (name / "memory.limit_in_bytes").write_text(str(limit))
        shell = f"echo $$ > {name}/cgroup.procs && exec \"$@\""
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run(["sh", "-c", shell, "sh", *cmd], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return {"rc": proc.returncode, "wall_s": wall, "peak_rss": ru * 1024, "rss_before": before * 1024,
                "cgroup_peak": int((name / "memory.max_usage_in_bytes").read_text()),
                "failcnt": int((name / "memory.failcnt").read_text()), "stdout": proc.stdout, "stderr": proc.stderr}
    finally:
        for _ in range(50):
            try:
                name.rmdir()
                break
            except OSError:
                time.sleep(0.2)


def cgroup_missing() -> bool:
    """True (and says so) when the cgroup v1 memory controller is not writable here: nothing can be measured."""
    if (CGROUP_ROOT / "memory.limit_in_bytes").exists() and os.access(CGROUP_ROOT, os.W_OK):
        return False
    print(f"SKIPPED: the cgroup v1 memory controller is not mounted writable at {CGROUP_ROOT} "
          "(needs root and cgroup v1); nothing measured")
    return True


def run_under_half(cmd: list[str], nbytes: int, env: dict) -> dict:
    """Run `cmd` with a memory limit of half the weights' size; exit with its stderr when it fails."""
    limit = nbytes // 2
    print(f"memory limit (cgroup v1 memory.limit_in_bytes): {limit / 2**30:.2f} GiB = weights / 2")
    print("$ layerscope " + " ".join(cmd[3:]))
    r = cgroup_run(cmd, limit, env)
    if r["rc"] != 0:
        print(f"FAILED (exit {r['rc']}, cgroup failcnt {r['failcnt']}):\n{r['stderr'][-2000:]}")
        sys.exit(1)
    return r


def values(path: Path) -> dict:
    d = json.loads(path.read_text())
    return {c["name"]: c["values"] for c in d["columns"]} if isinstance(d.get("columns"), list) else \
        {k: c["values"] for k, c in d["columns"].items()}


def max_diff(a, b) -> float:
    if isinstance(a, list):
        return max([max_diff(x, y) for x, y in zip(a, b)] + [0.0]) if len(a) == len(b) else float("inf")
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    return abs(a - b)


def small_model_check(tokens: int, env: dict) -> None:
    print("\n== small model (smollm2): out-of-core vs in-RAM scan ==")
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for mode in ("--offload", "--no-offload"):
            out = Path(tmp) / mode.strip("-")
            cmd = [*layerscope_cmd(), "scan", "smollm2", "--tokens", str(tokens), "--seq-len", "128", "-q",
                   "--out", str(out), mode]
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            print(f"layerscope {' '.join(cmd[3:])}: {time.perf_counter() - t0:.1f} s")
            outs[mode] = values(out / "scores.json")
        a, b = outs["--offload"], outs["--no-offload"]
        diffs = {k: max_diff(a[k], b[k]) for k in a}
        print(f"columns: {len(a)} (same names: {sorted(a) == sorted(b)}), max |difference| over all values: "
              f"{max(diffs.values()):.3g}; identical columns: {sum(v == 0 for v in diffs.values())}/{len(diffs)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=8.0, help="weights size in GB (1e9 bytes), fp32")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--small-tokens", type=int, default=256)
    ap.add_argument("--dir", default="/tmp", help="where the synthetic model is written (deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model")
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--skip-scan", action="store_true", help="no big scan (step 2)")
    ap.add_argument("--quantize-gb", type=float, default=0.0, help="also quantize a synthetic model of this size")
    ap.add_argument("--quant-tokens", type=int, default=1024, help="calibration tokens of the quantize runs")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, 2 shared cores: timings are noisy")
    if not args.skip_scan:
        big(args, env)  # first: ru_maxrss of children is the largest child so far
    if args.quantize_gb:
        big_quantize(args, env)
    if not args.skip_small:
        small_model_check(args.small_tokens, env)
        if args.quantize_gb:
            small_quantize_check(args.quant_tokens, env)


def quantize_cmd(model: str, out: Path, tokens: int, *extra: str) -> list[str]:
    return [*layerscope_cmd(), "quantize", model, "--by", "uniform", "--method", "gptq", "--bits", "4", "--group",
            "128", "--budget", "4.25", "--tokens", str(tokens), "--eval-tokens", "1024", "-q", "--out", str(out), *extra]


def big_quantize(args, env) -> None:
    print(f"\n== synthetic Llama >= {args.quantize_gb} GB fp32, quantize (GPTQ 4-bit) under half its size ==")
    if cgroup_missing():
        return
    root = Path(tempfile.mkdtemp(prefix="layerscope-ooq-", dir=args.dir))
    try:
        hidden, _, inter = QUANT_SHAPE
        layers, nbytes = write_model(root / "model", args.quantize_gb, shape=QUANT_SHAPE)
        print(f"wrote {layers} blocks (hidden {hidden}, MLP {inter}, {block_params(hidden, inter) * 4 / 1e6:.0f} MB "
              f"per block; embeddings and head {2 * 49152 * hidden * 4 / 1e6:.0f} MB), weights {nbytes / 1e9:.2f} GB")
        r = run_under_half(quantize_cmd(str(root / "model"), root / "quant", args.quant_tokens), nbytes, env)
        res = json.loads((root / "quant" / "quantize.json").read_text())
        ev, ex = res["evaluations"], res["exported"]["compressed-tensors model"]
        out_bytes = sum(f.stat().st_size for f in (root / "quant" / "model").glob("*.safetensors"))
        print(f"plan: {res['plan']['achieved_bpw']:.4f} bpw; perplexity unquantized {ev[0]['perplexity']:.2f}, "
              f"quantized {ev[1]['perplexity']:.2f} (random weights: only their agreement with an in-RAM run means "
              "anything; see the SmolLM2 check)")
        print(f"saved {out_bytes / 1e9:.2f} GB of safetensors ({len(ex['files'])} files); packed weights read back "
              f"and decompressed: max |difference| {ex['roundtrip_max_abs_diff']:.3g}")
        print(f"wall time: {r['wall_s']:.1f} s")
        print(f"peak RSS of the quantize process: {r['peak_rss'] / 2**30:.2f} GiB = {r['peak_rss'] / nbytes:.3f} x "
              f"weights size; cgroup peak {r['cgroup_peak'] / 2**30:.2f} GiB, limit hits {r['failcnt']}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def small_quantize_check(tokens: int, env: dict) -> None:
    import torch
    from safetensors.torch import load_file

    print("\n== small model (smollm2): quantize --offload vs --no-offload (GPTQ 4-bit g128, uniform) ==")
    with tempfile.TemporaryDirectory() as tmp:
        res, tensors = {}, {}
        for mode in ("--offload", "--no-offload"):
            out = Path(tmp) / mode.strip("-")
            cmd = quantize_cmd("smollm2", out, tokens, mode)
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            print(f"layerscope {' '.join(cmd[3:])}: {time.perf_counter() - t0:.1f} s")
            res[mode] = json.loads((out / "quantize.json").read_text())
            tensors[mode] = {}
            for f in sorted((out / "model").glob("*.safetensors")):
                tensors[mode].update(load_file(str(f)))
        a, b = tensors["--offload"], tensors["--no-offload"]
        same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        pa = [e["perplexity"] for e in res["--offload"]["evaluations"]]
        pb = [e["perplexity"] for e in res["--no-offload"]["evaluations"]]
        print(f"saved tensors: {len(a)} (out of core) vs {len(b)} (in RAM), all identical: {same}")
        print(f"perplexity unquantized / quantized: out of core {pa[0]:.4f} / {pa[1]:.4f}, in RAM {pb[0]:.4f} / "
              f"{pb[1]:.4f}; identical: {pa == pb}")


def big(args, env) -> None:
    print(f"\n== synthetic Llama >= {args.gb} GB fp32, scan under a memory limit of half its size ==")
    if cgroup_missing():
        return
    root = Path(tempfile.mkdtemp(prefix="layerscope-ooc-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        layers, nbytes = write_model(root / "model", args.gb)
        print(f"wrote {layers} blocks (hidden {HIDDEN}, MLP {INTER}, {block_params() * 4 / 1e6:.0f} MB per block), "
              f"weights {nbytes / 1e9:.2f} GB ({nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
        cmd = [*layerscope_cmd(), "scan", str(root / "model"), "--tokens", str(args.tokens), "--seq-len", "128",
               "--batch-size", "4", "-q", "--out", str(root / "scan")]
        r = run_under_half(cmd, nbytes, env)
        notes = json.loads((root / "scan" / "scores.json").read_text())["provenance"]["notes"]
        cols = values(root / "scan" / "scores.json")
        print(r["stdout"].strip().splitlines()[-1])
        print("engine: " + next((n for n in notes if "streamed" in n), "NOT streamed"))
        print(f"columns written: {len(cols)}; weight statistics present: "
              f"{any(k.startswith('stable_rank') for k in cols)}")
        print(f"wall time: {r['wall_s']:.1f} s")
        print(f"peak RSS of the scan process: {r['peak_rss'] / 2**30:.2f} GiB = "
              f"{r['peak_rss'] / nbytes:.3f} x weights size")
        print(f"cgroup peak usage (RSS + page cache): {r['cgroup_peak'] / 2**30:.2f} GiB = "
              f"{r['cgroup_peak'] / nbytes:.3f} x weights; limit hits (failcnt, page-cache reclaim): {r['failcnt']}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
