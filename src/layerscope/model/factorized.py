"""Factorized (low-rank) model directories: write them, and load them with real Linear(in, r) → Linear(r, out) pairs.

Layout of `factorized/`: the source config and tokenizer, `model.safetensors` holding every tensor of
the model except the factorized layers' weights, which are stored as `NAME.0.weight` [r, in] and
`NAME.1.weight` [out, r] (+ `NAME.1.bias`), and `layerscope_lowrank.json` with the ranks. Loading
builds the architecture from its config on the meta device, swaps each factorized layer for
`nn.Sequential(Linear(in, r, bias=False), Linear(r, out))` and assigns the tensors: the memory is
the factorized size, never the dense one. `dense/` is the same model with Ŵ = BA in place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerscope.errors import LayerscopeError

LOWRANK_JSON = "layerscope_lowrank.json"
_BUFFER_PREFIX = "layerscope_buffer."  # non-persistent buffers, stored so the meta-device build can be completed


def factorized_pair(linear: nn.Linear, rank: int) -> nn.Sequential:
    """Linear(in, r, no bias) → Linear(r, out, bias as the original), on the original's device/dtype."""
    kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
    return nn.Sequential(nn.Linear(linear.in_features, rank, bias=False, **kw),
                         nn.Linear(rank, linear.out_features, bias=linear.bias is not None, **kw))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _state_without_ties(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared tensors stored once (tied embeddings), contiguous, on CPU."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in model.state_dict().items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel():
            continue
        seen[ptr] = k
        out[k] = v.detach().cpu().contiguous()
    for k, v in model.named_buffers():
        if k not in out and v.data_ptr() not in seen:
            out[_BUFFER_PREFIX + k] = v.detach().cpu().contiguous()
    return out


def write_lowrank(lm, plan, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], out: Path, data: dict, *,
                  force: bool, source_dir: Path | None) -> tuple[dict, dict]:
    """Write factorized/ and dense/ (+ plan, result, report) into `out` atomically."""
    import copy

    from safetensors.torch import save_file

    from layerscope.actions.lowrank import LowrankResult
    from layerscope.actions.prune import PLAN_YAML
    from layerscope.outputs import output_dir, write_json_atomic, write_text_atomic

    model = lm.model
    dense_params = sum(p.numel() for p in model.parameters())
    fact = copy.deepcopy(model)
    for name, (a, b) in factors.items():
        lin = fact.get_submodule(name)
        pair = factorized_pair(lin, a.shape[0])
        pair[0].weight.data = a.to(lin.weight.dtype)
        pair[1].weight.data = b.to(lin.weight.dtype)
        if lin.bias is not None:
            pair[1].bias.data = lin.bias.data
        _set(fact, name, pair)
    fact_params = sum(p.numel() for p in fact.parameters())
    record = {"ranks": {n: int(a.shape[0]) for n, (a, _) in factors.items()}, "method": plan.method,
              "load": "layerscope.load(DIR) builds Linear(in, r) -> Linear(r, out) pairs"}
    with output_dir(out, verb="lowrank", force=force, sources=(source_dir,)) as tmp:
        model.save_pretrained(str(tmp / "dense"), safe_serialization=True)
        (tmp / "factorized").mkdir()
        model.config.save_pretrained(str(tmp / "factorized"))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp / "factorized"))
        save_file(_state_without_ties(fact), str(tmp / "factorized" / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "factorized" / LOWRANK_JSON, record)
        if lm.tokenizer is not None:
            for d in ("dense", "factorized"):
                lm.tokenizer.save_pretrained(str(tmp / d))
        plan.save(tmp / PLAN_YAML)
        files = {"factorized": "factorized (layerscope.load)", "dense": "dense (plain transformers)",
                 "plan": PLAN_YAML}
        params = {"dense": int(dense_params), "factorized": int(fact_params)}
        data.update(files=files, params=params, out=str(out))
        result = LowrankResult(data)
        result.to_json(tmp / "lowrank.json")
        write_text_atomic(tmp / "report.html", result.report_html())
    return files, params


def read_lowrank_json(path: str | os.PathLike) -> dict[str, Any] | None:
    f = Path(path) / LOWRANK_JSON
    if not f.is_file():
        return None
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayerscopeError(f"{f} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("ranks"), dict):
        raise LayerscopeError(f"{f} is not a layerscope low-rank record")
    return obj


def load_factorized(path: str | os.PathLike, record: dict, *, dtype=None, device: str | None = None,
                    trust_remote_code: bool = False) -> nn.Module:
    """Build the architecture on the meta device, swap in the factor pairs, assign the stored tensors."""
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    for name, r in record["ranks"].items():
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise LayerscopeError(f"{name} is not a linear layer in this architecture")
        _set(model, name, factorized_pair(lin, int(r)))
    state = load_file(str(path / "model.safetensors"), device=device or "cpu")
    if dtype is not None:
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        state = {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
    buffers = {k: state.pop(k) for k in [k for k in state if k.startswith(_BUFFER_PREFIX)]}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise LayerscopeError(f"{path}: tensors not in the architecture: {unexpected[:3]}")
    model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise LayerscopeError(f"{path}: parameters missing from model.safetensors: {still[:3]}")
    for key, value in buffers.items():  # non-persistent buffers (rotary inv_freq, embedding scales)
        mod_name, _, bname = key[len(_BUFFER_PREFIX):].rpartition(".")
        model.get_submodule(mod_name)._buffers[bname] = value
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise LayerscopeError(f"{path}: buffers not restored: {left[:3]}")
    model.layerscope_lowrank = record
    return model.eval()

