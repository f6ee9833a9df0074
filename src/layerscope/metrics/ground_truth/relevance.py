"""Relevance per layer in the spirit of LRP: gradient x activation at block and sublayer outputs.

Rule used: plain gradient x input ("Gradient*Input", the special case of LRP's z-rule / LRP-0 for
ReLU-free linear maps; AttnLRP implements its rules as modified gradients times inputs). There is no
modified backward pass here -- see "AttnLRP" below for why.

Loss L: the mean next-token NLL over every scored position of the calibration windows (the same
loss as the gradient scorers). Gradients dL/da come from torch autograd through the
block-sequential engine (one forward + backward per window, parameters frozen for the duration,
`relevance_batch_size` windows at a time, default 1; option ``relevance_tokens`` caps the
tokens). For a unit with activation a_t at token t (a vector over features):

* ``relevance``        -- block: sum_t |a_t . dL/da_t| with a = the block's output hidden state
  (LRP-style relevance of the representation the block hands on, as in "LRP-QViT" and "Beyond
  saliency" / RelP's per-layer relevance); attention / mlp: the same with a = the sublayer module's
  output, i.e. the sublayer's contribution to the residual stream.
* ``relevance_contribution`` (block) -- sum_t |(h_out - h_in)_t . dL/dh_out,t|: the same for what the
  block adds to the residual stream.
* ``relevance_signed`` -- -sum_t a_t . dL/da_t with a = the unit's contribution (block: h_out - h_in;
  sublayer: module output). This is the first-order Taylor estimate of the loss increase when the
  contribution is zeroed (the ablation of `ablation_dloss`), so higher = more important; it can be
  negative for units whose removal would lower the loss to first order.

The absolute values are taken per token (after the dot product over features), then summed over
tokens: a unit whose contributions help some tokens and hurt others still scores high.

AttnLRP (Achtibat et al. 2024) via the ``lxt`` package was tried (LXT 2.1, the current release, with
transformers 5.x): ``import lxt.efficient`` fails because ``lxt/efficient/models/bert.py`` imports
``transformers.modeling_attn_mask_utils``, removed in transformers 5 (and ``models/vit_torch.py``
needs torchvision); bypassing that import, ``lxt.efficient.patches.patch_attention`` replaces
``modeling_llama.ALL_ATTENTION_FUNCTIONS`` (an ``AttentionInterface`` in transformers 5) by a plain
dict, and the Llama attention forward then fails with ``AttributeError: 'dict' object has no
attribute 'get_interface'``. LXT also patches classes process-wide and its wheel depends on a CUDA
torch build, bitsandbytes, open_clip and timm. `lxt_status()` reports the state on this machine;
lxt is not a dependency.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from layerscope.engine.removal import ablation_module
from layerscope.errors import LayerscopeError
from layerscope.metrics.base import Column, Metric

UNITS = ("block", "attention", "mlp")


def lxt_status() -> str:
    """Whether AttnLRP from the `lxt` package can be used with the installed transformers."""
    try:
        import lxt.efficient  # noqa: F401
    except ImportError as exc:
        return f"lxt unusable: import lxt.efficient failed: {type(exc).__name__}: {exc}"
    except (AttributeError, RuntimeError, TypeError) as exc:  # pragma: no cover - lxt's own import-time errors
        return f"lxt unusable: {type(exc).__name__}: {exc}"
    try:
        from transformers.models.llama import modeling_llama

        if hasattr(modeling_llama.ALL_ATTENTION_FUNCTIONS, "get_interface"):
            return ("lxt imports, but its attention patch replaces transformers 5's AttentionInterface by a "
                    "dict (Llama then fails with AttributeError: 'dict' object has no attribute 'get_interface')")
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return "lxt imports (untested with this transformers version)"


def relevance_statistics(runner, max_tokens: int | None = None) -> dict[str, Any]:
    """Gradient x activation sums per block / sublayer over the runner's batches (see module doc)."""
    parts = runner.parts
    if not parts.has_lm_head:
        raise LayerscopeError("relevance needs a causal LM head (the loss is the next-token NLL)")
    L = parts.num_layers
    batches = list(runner.batches)
    if max_tokens:
        kept, total = [], 0
        for b in batches:
            if kept and total + b.inputs["input_ids"].numel() > max_tokens:
                break
            kept.append(b)
            total += b.inputs["input_ids"].numel()
        batches = kept
    N = sum(b.inputs["input_ids"].shape[0] * (b.inputs["input_ids"].shape[1] - 1) for b in batches)
    acc = {k: [0.0] * L for k in ("block", "block_contribution", "block_signed", "attention", "attention_signed",
                                   "mlp", "mlp_signed")}
    sub_modules = {(u, i): ablation_module(parts, i, u) for i in range(L) for u in ("attention", "mlp")}
    params = list(parts.model.parameters())
    flags = [p.requires_grad for p in params]
    store: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def grab(key):
        def hook(module, args, output):
            store[key] = output[0] if isinstance(output, tuple) else output

        return hook

    t0 = time.perf_counter()
    total_nll = 0.0
    try:
        for p in params:
            p.requires_grad_(False)
        for key, mod in sub_modules.items():
            handles.append(mod.register_forward_hook(grab(key)))
        for batch in batches:
            store.clear()
            with torch.enable_grad():
                h = batch.first_hidden.detach().clone().requires_grad_(True)
                ins, outs = [], []
                for i in range(L):
                    ins.append(h)
                    h = runner.forward_block(i, h, batch)
                    outs.append(h)
                ids = batch.inputs["input_ids"].to(runner.device)
                logits = runner.head_logits(h)
                nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                subs = [store[(u, i)] for i in range(L) for u in ("attention", "mlp")]
                grads = torch.autograd.grad(nll / N, outs + subs)
            total_nll += float(nll.detach())
            with torch.no_grad():
                for i in range(L):
                    g = grads[i].double()
                    out = outs[i].detach().double()
                    delta = out - ins[i].detach().double()
                    acc["block"][i] += float((out * g).sum(-1).abs().sum())
                    dg = (delta * g).sum(-1)
                    acc["block_contribution"][i] += float(dg.abs().sum())
                    acc["block_signed"][i] -= float(dg.sum())
                for k, (i, u) in enumerate((i, u) for i in range(L) for u in ("attention", "mlp")):
                    a = subs[k].detach().double()
                    ag = (a * grads[L + k].double()).sum(-1)
                    acc[u][i] += float(ag.abs().sum())
                    acc[f"{u}_signed"][i] -= float(ag.sum())
            del grads, outs, ins, subs, logits, nll
            store.clear()
    finally:
        for hd in handles:
            hd.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return {"values": acc, "loss": total_nll / max(N, 1), "positions_scored": N,
            "tokens": sum(b.inputs["input_ids"].numel() for b in batches),
            "wall_time_s": round(time.perf_counter() - t0, 3)}


def _relevance_runner(ctx):
    """A runner over the calibration windows with `relevance_batch_size` windows per batch."""
    from layerscope.engine.runner import BlockRunner, make_batches

    if ctx.runner is None or not ctx.runner.batches or "input_ids" not in ctx.runner.batches[0].inputs:
        raise LayerscopeError("relevance needs calibration token windows")
    ids = torch.cat([b.inputs["input_ids"] for b in ctx.runner.batches], dim=0)
    cap = ctx.options.get("relevance_tokens")
    if cap:
        ids = ids[: max(1, int(cap) // ids.shape[1])]
    batches, _ = make_batches(ids, int(ctx.options.get("relevance_batch_size", 1)))
    runner = BlockRunner(ctx.parts, batches)
    runner.capture()
    return runner


class Relevance(Metric):
    """Gradient x activation relevance per block and sublayer (LRP-style; module docstring)."""

    name = "relevance"
    direction = "higher"
    definition = "sum over tokens of |a . dL/da|, a = the block's output / the sublayer's output"
    reference = ("Achtibat et al. 2024 (AttnLRP); Ding et al. 2024 (LRP-QViT); "
                 "Beyond saliency / RelP (relevance patching); Shrikumar et al. 2016 (gradient x input)")

    @staticmethod
    def unavailable(parts) -> str | None:
        return None if parts.has_lm_head else "needs a causal LM head (the loss is the next-token NLL)"

    def finish(self) -> list[Column]:
        r = relevance_statistics(_relevance_runner(self.ctx))
        v = r["values"]
        info = {k: r[k] for k in ("loss", "positions_scored", "tokens", "wall_time_s")}
        info["rule"] = "gradient x input (LRP-0 equivalent for linear maps); no AttnLRP rules"
        sig = "-sum over tokens of a . dL/da, a = the unit's contribution (first-order estimate of the ablation's loss change)"
        return [
            self.column("block", v["block"], **info),
            self.column("block", v["block_contribution"], metric="relevance_contribution", **info,
                        definition="sum over tokens of |(h_out - h_in) . dL/dh_out|"),
            self.column("block", v["block_signed"], metric="relevance_signed", definition=sig, **info),
            self.column("attention", v["attention"], **info,
                        definition="sum over tokens of |a . dL/da|, a = the attention module's output"),
            self.column("attention", v["attention_signed"], metric="relevance_signed", definition=sig, **info),
            self.column("mlp", v["mlp"], **info, definition="sum over tokens of |a . dL/da|, a = the MLP module's output"),
            self.column("mlp", v["mlp_signed"], metric="relevance_signed", definition=sig, **info),
        ]
