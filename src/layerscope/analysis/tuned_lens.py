"""The tuned lens: per-layer affine translators into the final layer's basis, trained to match the model's own prediction (Belrose et al. 2023); checkpoints for resume."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from layerscope.errors import LayerscopeError

CHECKPOINT = "checkpoint"


ARTEFACT = "tuned_lens"


class LensHead:
    """The model's final norm + output head (and logit soft-capping), for decoding any layer."""

    def __init__(self, parts):
        from layerscope.engine.runner import BlockRunner

        if parts.head is None or not parts.causal:
            raise LayerscopeError("lenses need a causal language model with an output head")
        self.parts = parts
        self._runner = BlockRunner(parts, [])
        self.cap = getattr(getattr(parts.model, "config", None), "final_logit_softcapping", None)
        self._w16: torch.Tensor | None = None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Exact fp32 logits, as the model itself computes them from its last residual state."""
        return self._runner.head_logits(h)

    def logits_fast(self, h: torch.Tensor) -> torch.Tensor:
        """Training-time logits: the same map, with the vocabulary product in bfloat16."""
        x = self.parts.head_input(h)
        out = (x.to(torch.bfloat16) @ self.w16.T).float()
        bias = getattr(self.parts.head, "bias", None)
        if bias is not None:
            out = out + bias.detach().float()
        if self.cap:
            out = torch.tanh(out / self.cap) * self.cap
        return out

    @property
    def w16(self) -> torch.Tensor:
        if self._w16 is None:
            self._w16 = self.parts.head.weight.detach().to(torch.bfloat16)
        return self._w16

    def kl_to(self, h: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
        """KL(target || lens(h)) per row, differentiable in h. h: [G, B, d]; target_logp: [B, V].

        Uses a fused forward/backward (gradient softmax - p straight from the saved logits) when the
        head is a plain linear map, else autograd through log_softmax.
        """
        G, B, d = h.shape
        x = self.parts.head_input(h)
        if self.cap or getattr(self.parts.head, "bias", None) is not None:
            logq = F.log_softmax(self.logits_fast(h.reshape(G * B, d)), dim=-1).view(G, B, -1)
            return (target_logp.exp()[None] * (target_logp[None] - logq)).sum(-1)
        return _FusedKL.apply(x, self.w16, target_logp)


class _FusedKL(torch.autograd.Function):
    """KL(p || softmax(x W^T)) for x [G, B, d], p given as log-probs [B, V]; returns [G, B]."""

    @staticmethod
    def forward(ctx, x, w16, target_logp):
        G, B, d = x.shape
        z = (x.reshape(G * B, d).to(torch.bfloat16) @ w16.T).float().view(G, B, -1)
        lse = torch.logsumexp(z, -1)  # [G, B]
        p = target_logp.exp()
        neg_entropy = (p * target_logp).sum(-1)  # [B]
        cross = torch.einsum("gbv,bv->gb", z, p)
        ctx.save_for_backward(z, lse, p, w16)
        ctx.in_dtype = x.dtype
        return neg_entropy[None] - cross + lse

    @staticmethod
    def backward(ctx, grad):
        z, lse, p, w16 = ctx.saved_tensors
        G, B, V = z.shape
        q = z.sub_(lse[..., None]).exp_()  # softmax, in place of the saved logits
        q.sub_(p[None]).mul_(grad[..., None])
        gx = (q.view(G * B, V).to(torch.bfloat16) @ w16).to(ctx.in_dtype).view(G, B, -1)
        return gx, None, None


class Translators(nn.Module):
    """Affine translators for layers 0..L-1: T_l(h) = h + h A_l^T + scale_l * b_l (identity at init).

    `scale_l` (a fixed buffer, the layer's RMS activation size) lets one learning rate serve layers
    whose residual norms differ by orders of magnitude; `effective_bias` is scale * b.
    """

    def __init__(self, num_layers: int, d_model: int, scale: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(num_layers, d_model))
        self.register_buffer("scale", torch.ones(num_layers) if scale is None else scale.float().clone())

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    def effective_bias(self) -> torch.Tensor:
        return self.bias * self.scale[:, None]

    def translate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer >= self.num_layers:
            return h  # the last layer is the model's own output
        w = self.weight[layer].to(h.dtype)
        return h + h @ w.T + (self.bias[layer] * self.scale[layer]).to(h.dtype)

    def translate_all(self, h: torch.Tensor) -> torch.Tensor:
        """h: [num_layers, B, d] -> translated, all layers at once."""
        return h + torch.einsum("lbd,led->lbe", h, self.weight) + (self.bias * self.scale[:, None])[:, None, :]


@dataclass
class TunedLens:
    """A trained tuned lens: translators plus the head of the model it was trained for."""

    translators: Translators
    head: LensHead
    meta: dict = field(default_factory=dict)

    def logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.translators.translate(layer, h))

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        from safetensors.torch import save_file

        from layerscope.outputs import write_json_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        st = directory / f"{ARTEFACT}.safetensors"
        tmp = directory / f".{ARTEFACT}.safetensors.tmp"
        save_file({"weight": self.translators.weight.detach().contiguous(),
                   "bias": self.translators.effective_bias().detach().contiguous()}, str(tmp))
        os.replace(tmp, st)
        meta = dict(self.meta, format="layerscope tuned lens v1",
                    parametrisation="T_l(h) = h + h @ weight[l].T + bias[l] for layers 0..L-1; layer L is identity",
                    safetensors_sha256=_sha256(st))
        js = write_json_atomic(directory / f"{ARTEFACT}.json", meta)
        return st, js


def load_tuned_lens(directory: str | Path, model: Any) -> TunedLens:
    """Load a tuned lens saved by `TunedLens.save` for `model` (a Subject or a loaded model)."""
    from safetensors.torch import load_file

    from layerscope.model.adapter import find_parts
    from layerscope.model.subject import Subject

    directory = Path(directory)
    st, js = directory / f"{ARTEFACT}.safetensors", directory / f"{ARTEFACT}.json"
    if not st.is_file() or not js.is_file():
        raise LayerscopeError(f"no tuned lens in {directory} (expected {st.name} and {js.name})")
    meta = json.loads(js.read_text(encoding="utf-8"))
    tensors = load_file(str(st))
    parts = model.parts if isinstance(model, Subject) else find_parts(model)
    w, b = tensors["weight"], tensors["bias"]
    if w.shape[0] != parts.num_layers:
        raise LayerscopeError(f"tuned lens in {directory} has {w.shape[0]} translators, model has {parts.num_layers} blocks")
    tr = Translators(w.shape[0], w.shape[1])
    with torch.no_grad():
        tr.weight.copy_(w)
        tr.bias.copy_(b)
    return TunedLens(tr, LensHead(parts), meta)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(warmup, 1))
    decay = 1.0 - 0.9 * step / max(steps, 1)
    return lr * warm * max(decay, 0.1)


def _save_checkpoint(directory: Path, translators: Translators, opt: torch.optim.Optimizer, step: int,
                     meta: dict) -> None:
    from safetensors.torch import save_file

    from layerscope.outputs import write_json_atomic

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": translators.weight.detach().contiguous(), "bias": translators.bias.detach().contiguous(),
               "scale": translators.scale.detach().contiguous()}
    state = opt.state_dict()
    names = ["weight", "bias"]
    for idx, st in state["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"optim.{names[idx]}.{key}"] = st[key].detach().contiguous()
    adam_steps = {names[idx]: float(st["step"]) for idx, st in state["state"].items()}
    st_path = directory / f"{CHECKPOINT}.safetensors"
    tmp = directory / f".{CHECKPOINT}.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, st_path)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    write_json_atomic(directory / f"{CHECKPOINT}.json", dict(meta, step=step, adam_steps=adam_steps,
                                                           param_groups=groups,
                                                           safetensors_sha256=_sha256(st_path)))


def _load_checkpoint(directory: Path, meta: dict, translators: Translators, opt: torch.optim.Optimizer) -> tuple[int, list]:
    from safetensors.torch import load_file

    js, st = directory / f"{CHECKPOINT}.json", directory / f"{CHECKPOINT}.safetensors"
    if not js.is_file() or not st.is_file():
        raise LayerscopeError(f"--resume: no checkpoint in {directory} (expected {js.name} and {st.name})")
    try:
        saved = json.loads(js.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LayerscopeError(f"--resume: {js} is not valid JSON ({exc})") from None
    if saved.get("safetensors_sha256") != _sha256(st):
        raise LayerscopeError(f"--resume: {st.name} does not match {js.name} (interrupted write?); start afresh without --resume")
    for key in ("model_id", "weights_sha256", "num_layers", "d_model", "train_tokens", "seq_len", "seed", "data",
                "batch_tokens", "lr"):
        if saved.get(key) != meta.get(key):
            raise LayerscopeError(f"--resume: the checkpoint was made with {key}={saved.get(key)!r}, "
                                  f"this run has {meta.get(key)!r}")
    tensors = load_file(str(st))
    with torch.no_grad():
        translators.weight.copy_(tensors["weight"])
        translators.bias.copy_(tensors["bias"])
        translators.scale.copy_(tensors["scale"])
    names = ["weight", "bias"]
    state = {"state": {}, "param_groups": []}
    for i, nme in enumerate(names):
        if f"optim.{nme}.exp_avg" in tensors:
            state["state"][i] = {"step": torch.tensor(saved["adam_steps"][nme]),
                                 "exp_avg": tensors[f"optim.{nme}.exp_avg"],
                                 "exp_avg_sq": tensors[f"optim.{nme}.exp_avg_sq"]}
    groups = saved.get("param_groups") or [{}]
    state["param_groups"] = [dict(groups[0], params=[0, 1])]
    opt.load_state_dict(state)
    return int(saved["step"]), list(saved.get("curve") or [])


def train_translators(head: LensHead, states: torch.Tensor, *, steps: int, lr: float = 1e-3,
                      weight_decay: float = 1e-3, batch_tokens: int = 32, warmup: int = 10, seed: int = 0,
                      checkpoint_dir: Path | None = None, checkpoint_every: int = 50, resume: bool = False,
                      meta: dict | None = None, stop_at: int | None = None,
                      progress: Callable[[int, int, float], None] | None = None) -> tuple[Translators, list, int]:
    """Fit translators for layers 0..L-1 on cached states [L+1, n, d].

    The learning-rate schedule spans `steps`; `stop_at` ends this call early (checkpoint written),
    as an interruption would, so that a later resume with the same `steps` continues exactly.
    Returns (translators, loss curve, first step run here, step reached).
    """
    Lp1, n, d = states.shape
    L = Lp1 - 1
    scale = states[:L].norm(dim=-1).mean(-1) / math.sqrt(d)
    translators = Translators(L, d, scale)
    opt = torch.optim.AdamW([translators.weight, translators.bias], lr=lr, weight_decay=weight_decay)
    meta = dict(meta or {})
    start, curve = 0, []
    if resume:
        if checkpoint_dir is None:
            raise LayerscopeError("--resume needs an output directory holding a checkpoint")
        start, curve = _load_checkpoint(checkpoint_dir, meta, translators, opt)
    for p in head.parts.model.parameters():
        p.requires_grad_(False)
    end = max(start, steps if stop_at is None else min(steps, stop_at))
    for step in range(start, end):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n, (batch_tokens,), generator=g)
        with torch.no_grad():
            target = F.log_softmax(head.logits_fast(states[L, idx]), dim=-1)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        h = translators.translate_all(states[:L, idx])  # [L, B, d]
        kl = head.kl_to(h, target).mean(-1)  # [L]
        loss = kl.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean_kl = float(kl.detach().mean())
        curve.append([step + 1, mean_kl])
        if progress:
            progress(step + 1, steps, mean_kl)
        if checkpoint_dir is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == end):
            _save_checkpoint(checkpoint_dir, translators, opt, step + 1, dict(meta, curve=curve))
    return translators, curve, start, end
