"""`quantize` out of core: a model whose weights exceed memory, quantized and written block by block.

The blocks stream from the model's safetensors shards (model/offload.py). One block-sequential pass
(`engine.moments.linear_moments`) collects a block's XᵀX, quantizes its planned linears (GPTQ with
that block's Hessians, sequential or not, exactly as in memory), packs them with compressed-tensors
and writes the block's shard (`model.offload_write.ShardWriter`) before the next block loads; the
config gets the same `quantization_config` the in-memory save writes. Each packed weight is read
back and decompressed with the library as soon as its shard is written, and compared with the
quantized weight. The held-out evaluation streams the model twice: as it is, and with every
planned weight taken from the files just written -- the perplexity reported is the saved model's.

Plans that need the whole model at once (`--by measured`: its gradient pass and plan search) are
not made out of core; make the plan where the model fits (or on a smaller sibling with the same
layer names) and apply it here with `--plan`, or use `--by uniform`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from layerscope.errors import LayerscopeError

NOT_OUT_OF_CORE = ("quantize --by measured needs the whole model at once (its gradient pass and its plan search), "
                   "and this model is streamed from disk (out-of-core): use --by uniform, or apply a plan made "
                   "where the model fits with --plan FILE")


@dataclass
class _Saved:
    """What the config needs of a packed layer (compressed.quantization_config reads these two)."""

    bits: int
    group_size: int


@torch.no_grad()
def write_quantized(lm, parts, plan, state: dict, directory: Path, *, sequential: bool,
                    log: Callable[[str], None] = lambda m: None) -> dict:
    """Quantize `plan` (a GPTQ plan) block by block and write the compressed-tensors model into
    `directory`. Returns {"packed": {name: _Saved}, "roundtrip_max_abs_diff": float, "bytes": int}."""
    from layerscope.actions.export.compressed import compress_block, packed_weight, write_config
    from layerscope.actions.quantize_measured import calibration_batches
    from layerscope.compress.quant_stats import quantize_weight
    from layerscope.engine.moments import linear_moments
    from layerscope.model.offload import streamer_of
    from layerscope.model.offload_write import ShardWriter

    assignment = plan.assignment()
    prefix = parts.blocks_path + "."
    batches = state.get("batches") or calibration_batches(lm.tokenizer, state["tokens"], state["seq_len"])
    damp, act_order = state["damp"], state["act_order"]
    writer = ShardWriter(directory, parts.num_layers)
    writer.put_rest(lm.model, prefix)
    packed: dict[str, _Saved] = {}
    worst = 0.0

    def on_block(i: int, block, stats) -> None:
        nonlocal worst
        mine = {n[len(f"{prefix}{i}."):]: s for n, s in assignment.items() if n.startswith(f"{prefix}{i}.")}
        missing = sorted(set(mine) - set(stats))
        if missing:
            raise LayerscopeError(f"block {i}: planned layer {missing[0]} is not a linear layer of the block")
        qws = {}
        for lin, scheme in mine.items():
            st = stats[lin]
            H = st.hessian(damp) if scheme.method == "gptq" and scheme.quantized else None
            w, qw = quantize_weight(st.module.weight.data, scheme, H, act_order)
            st.module.weight.data = w  # sequential: the next block's inputs come from the quantized block
            if qw is not None:
                qws[lin] = qw
        writer.put(i + 1, compress_block(block, qws, f"{prefix}{i}."))
        for lin, qw in qws.items():  # what a loader will read back equals what was computed
            name = f"{prefix}{i}.{lin}"
            back = packed_weight(writer.file_of(f"{name}.weight_packed"), name, qw.bits, qw.group_size)
            worst = max(worst, float((back - qw.weight.float()).abs().max()))
            packed[name] = _Saved(qw.bits, qw.group_size)
        log(f"  block {i}: {len(qws)} linear layers quantized and written")

    linear_moments(parts, batches, on_block=on_block, sequential=sequential)
    s = streamer_of(lm.model)
    if s is not None:
        s.release()  # the quantized values leave with the blocks; the source shards never changed
    total = writer.finish(lm.model)
    write_config(_empty_copy(lm.model), packed, directory)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(directory))
    return {"packed": packed, "roundtrip_max_abs_diff": worst, "bytes": total, "index": dict(writer.index)}


def _empty_copy(model) -> torch.nn.Module:
    """The model's module tree on the meta device (no weights): what the schemes attach to."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return type(model)._from_config(model.config)


def saved_loaders(directory: Path, written: dict, plan) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """{weight name: loader} taking every planned weight from the written files (packed ones
    decompressed) -- for `BlockStreamer.substituted`."""
    from safetensors import safe_open

    from layerscope.actions.export.compressed import packed_weight

    index, packed = written["index"], written["packed"]
    loaders = {}
    for name in plan.assignment():
        if name in packed:
            f, p = directory / index[f"{name}.weight_packed"], packed[name]
            loaders[f"{name}.weight"] = lambda _src, f=f, n=name, p=p: packed_weight(f, n, p.bits, p.group_size)
        else:  # kept in float (16-bit entries): the plain tensor written for it
            f = directory / index[f"{name}.weight"]

            def plain(_src, f=f, key=f"{name}.weight"):
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    return fh.get_tensor(key)

            loaders[f"{name}.weight"] = plain
    return loaders


def rounded_loaders(plan) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """{weight name: loader} rounding each planned weight to its grid as its block loads (RTN/HQQ
    plans, evaluated without a saved model)."""
    from layerscope.compress.quant import fake_quant

    return {f"{n}.weight": (lambda src, s=s: fake_quant(src.float(), s)) for n, s in plan.assignment().items()}


def evaluate_streamed(lm, plan, loaders: dict, *, eval_tokens: int, say) -> list[dict]:
    """Held-out perplexity of the source model and of the quantized one (its weights from `loaders`),
    both streamed block by block."""
    import math

    from layerscope.actions.quantize_measured import perplexity_with
    from layerscope.evaluation.perplexity import PerplexityProtocol, token_stream
    from layerscope.model.offload import streamer_of

    proto = PerplexityProtocol(max_tokens=eval_tokens)
    ids = token_stream(lm.tokenizer, proto)
    say(f"evaluating held-out perplexity out of core ({proto.describe()})")
    base = perplexity_with(lm.model, ids, proto, None)
    with streamer_of(lm.model).substituted(loaders):
        ppl = perplexity_with(lm.model, ids, proto, None)
    measured = math.log(ppl) - math.log(base)
    say(f"plan {plan.by}: {plan.achieved_bpw:.4f} bpw, perplexity {ppl:.4f} ({ppl / base - 1:+.2%}) "
        f"against {base:.4f} unquantized")
    plan.provenance["evaluation"] = {"protocol": proto.model_dump(), "unquantized_perplexity": base,
                                     "plan_perplexity": ppl,
                                     "path": "out of core: each block streamed with its planned weights "
                                             + ("read back from the saved model" if plan.method == "gptq"
                                                else "rounded as the block loads") + ", fp32 compute"}
    return [{"name": "unquantized", "bpw": 32.0, "perplexity": base},
            {"name": f"plan ({plan.by})", "bpw": plan.achieved_bpw, "perplexity": ppl,
             "predicted_dnll": plan.objective, "measured_dnll": measured}]
