"""Logit lens and tuned lens, side by side.

* Logit lens (nostalgebraist 2020): decode the residual stream at layer l with the model's own
  final norm and output head.
* Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned
  Lens"): first map the layer-l state through an affine translator,
  ``T_l(h) = h + A_l h + b_l``, initialised to the identity (A_l = 0, b_l = 0, so an untrained
  tuned lens *is* the logit lens), trained to minimise KL(final || lens_l) on calibration text.
  Layer L (the output of the last block) is the model's own prediction and has no translator.

Layers follow the probe convention: 0 = embeddings (input of block 0), l = output of block l-1.

Kept cheap on CPU: the residual states of all layers are cached once for a few thousand sampled
token positions of the Wikipedia calibration split (the first position of each window is never
sampled - it is an attention sink), and the translators are trained on random minibatches of those
positions with AdamW (a few hundred steps; the output-head product runs in bfloat16 during
training only).  Training is resumable: translator weights, optimizer moments and the step are
checkpointed to ``checkpoint.safetensors`` + ``checkpoint.json``; each step's minibatch depends
only on (seed, step), so a resumed run continues exactly where it stopped.  Evaluation (fp32) is
on the held-out Wikipedia evaluation split: per layer, KL(final || lens) and top-1 agreement with
the model's final prediction.  The trained lens is saved as ``tuned_lens.safetensors`` (tensors
``weight`` [L, d, d] = A and ``bias`` [L, d] = b) with ``tuned_lens.json`` metadata.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from layerscope.errors import LayerscopeError

CHECKPOINT = "checkpoint"
ARTEFACT = "tuned_lens"


# =========================================================================== lens head


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
        x = self.parts.final_norm(h) if self.parts.final_norm is not None else h
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
        x = self.parts.final_norm(h) if self.parts.final_norm is not None else h
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


# =========================================================================== translators


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


# =========================================================================== data


@torch.no_grad()
def cache_states(subject, data: Any, *, n_tokens: int, seq_len: int, split: str, seed: int,
                 batch_size: int = 4) -> tuple[torch.Tensor, str]:
    """Residual states [L+1, n_tokens, d] at randomly sampled positions (never position 0)."""
    from layerscope.data.windows import prepare_tokens
    from layerscope.engine.taps import run_base, tap_layers
    from layerscope.model.subject import max_context

    ctx = max_context(subject.model)
    if ctx:
        seq_len = min(seq_len, ctx)
    if seq_len < 2:
        raise LayerscopeError("seq_len must be at least 2")
    # sample about half the positions of each window: spread over more text, less correlated
    per_window = max(1, (seq_len - 1) // 2)
    n_windows = max(1, math.ceil(n_tokens / per_window))
    ids, source = prepare_tokens(subject.tokenizer, data, n_windows * seq_len, seq_len, split)
    g = torch.Generator().manual_seed(seed)
    L = subject.num_layers
    chunks: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]
    for s in range(0, ids.shape[0], batch_size):
        batch = ids[s:s + batch_size]
        pos = torch.stack([1 + torch.randperm(seq_len - 1, generator=g)[:per_window].sort().values
                           for _ in range(batch.shape[0])])
        rows = torch.arange(batch.shape[0])[:, None].expand_as(pos)

        def grab(layer: int, h: torch.Tensor) -> None:
            chunks[layer].append(h[rows, pos].reshape(-1, h.shape[-1]).float().cpu())

        with tap_layers(subject.parts, grab):
            run_base(subject.parts, batch, torch.ones_like(batch))
    states = torch.stack([torch.cat(c)[:n_tokens] for c in chunks])
    if not torch.isfinite(states).all():
        from layerscope.errors import NumericalError

        raise NumericalError("non-finite hidden states (NaN/Inf) while caching lens training data")
    return states, str(source)


# =========================================================================== evaluation


@torch.no_grad()
def evaluate_lenses(head: LensHead, states: torch.Tensor, translators: Translators | None,
                    chunk: int = 256) -> dict[str, list[float]]:
    """Per layer 0..L: KL(final || lens) in nats and top-1 agreement, for logit and tuned lens."""
    Lp1, n, _ = states.shape
    L = Lp1 - 1
    out = {k: [0.0] * Lp1 for k in ("logit_kl", "tuned_kl", "logit_top1", "tuned_top1")}
    for s in range(0, n, chunk):
        final = F.log_softmax(head.logits(states[L, s:s + chunk]), dim=-1)
        p = final.exp()
        top = final.argmax(-1)
        w = min(chunk, n - s) / n
        for layer in range(Lp1):
            h = states[layer, s:s + chunk]
            logit = F.log_softmax(head.logits(h), dim=-1)
            out["logit_kl"][layer] += w * float((p * (final - logit)).sum(-1).mean())
            out["logit_top1"][layer] += w * float((logit.argmax(-1) == top).float().mean())
            if translators is not None and layer < L:
                tuned = F.log_softmax(head.logits(translators.translate(layer, h)), dim=-1)
            else:
                tuned = logit
            out["tuned_kl"][layer] += w * float((p * (final - tuned)).sum(-1).mean())
            out["tuned_top1"][layer] += w * float((tuned.argmax(-1) == top).float().mean())
    return out


# =========================================================================== training


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


# =========================================================================== API


@dataclass
class LensResult:
    model_id: str
    model_family: str
    weights_sha256: str | None
    num_layers: int
    layer_names: list[str]
    logit_kl: list[float] | None = None
    tuned_kl: list[float] | None = None
    logit_top1: list[float] | None = None
    tuned_top1: list[float] | None = None
    steps: int = 0
    resumed_from: int = 0
    curve: list = field(default_factory=list)
    train_tokens: int = 0
    eval_tokens: int = 0
    train_source: str = ""
    eval_source: str = ""
    options: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    neurons: Any = None  # neurons.NeuronResult
    artefact: str | None = None
    notes: list[str] = field(default_factory=list)
    created: str = ""
    tuned_lens: TunedLens | None = field(default=None, repr=False)

    def lens_dict(self) -> dict | None:
        if self.logit_kl is None:
            return None
        return {
            "layer_names": self.layer_names,
            "layer_convention": "layer 0 = embeddings (input of block 0); layer l = output of block l-1",
            "logit_kl": self.logit_kl, "tuned_kl": self.tuned_kl,
            "logit_top1": self.logit_top1, "tuned_top1": self.tuned_top1,
            "steps": self.steps, "resumed_from": self.resumed_from,
            "train_curve": self.curve[:: max(1, len(self.curve) // 100)],
            "train_tokens": self.train_tokens, "eval_tokens": self.eval_tokens,
            "train_source": self.train_source, "eval_source": self.eval_source,
            "artefact": self.artefact,
            "definition": "KL(final || lens) in nats and top-1 agreement with the model's final prediction, "
                          "on held-out tokens; tuned lens = Belrose et al. 2023 affine translators",
        }

    def to_dict(self) -> dict:
        from layerscope import __version__
        from layerscope.analysis.probes import _jsonable

        return _jsonable({
            "kind": "layerscope.lens",
            "model_id": self.model_id, "model_family": self.model_family, "weights_sha256": self.weights_sha256,
            "num_layers": self.num_layers,
            "lens": self.lens_dict(),
            "neurons": self.neurons.to_dict() if self.neurons is not None else None,
            "options": self.options, "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "notes": self.notes, "created": self.created, "layerscope_version": __version__,
        })

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if path is not None:
            from layerscope.outputs import write_text_atomic

            write_text_atomic(path, text + "\n")
        return text

    def summary(self) -> str:
        lines = [f"{self.model_id}: tuned lens {self.steps} steps on {self.train_tokens} tokens, "
                 f"evaluated on {self.eval_tokens} held-out tokens"]
        if self.logit_kl is not None:
            lines.append(f"{'layer':>5} {'logit KL':>9} {'tuned KL':>9} {'logit top1':>10} {'tuned top1':>10}")
            for i in range(len(self.logit_kl)):
                lines.append(f"{i:>5} {self.logit_kl[i]:>9.3f} {self.tuned_kl[i]:>9.3f} "
                             f"{self.logit_top1[i]:>10.3f} {self.tuned_top1[i]:>10.3f}")
        return "\n".join(lines)


def lens(
    model: Any = None,
    *,
    steps: int = 250,
    resume: bool = False,
    out: str | Path | None = None,
    train_data: Any = "wikipedia",
    eval_data: Any = "wikipedia",
    train_tokens: int = 4096,
    eval_tokens: int = 1024,
    seq_len: int = 256,
    batch_tokens: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    checkpoint_every: int = 50,
    stop_at: int | None = None,
    lenses: bool = True,
    neurons: Sequence[int] | str | None = None,
    promote: Sequence[str] | str | None = None,
    top_k: int = 10,
    tokenizer: Any = None,
    seed: int = 0,
    progress: bool = False,
    trust_remote_code: bool = False,
) -> LensResult:
    """Logit lens beside a trained tuned lens (+ optional neuron decoding) for a causal LM.

    With `out`, the tuned lens (tuned_lens.safetensors + .json) and a resumable checkpoint are
    written there; `resume=True` continues the checkpoint in `out` up to `steps`.
    Wikipedia calibration split for training, evaluation split for the reported numbers.
    """
    from layerscope.model.subject import Subject, layer_names, load_subject

    t0 = time.perf_counter()
    subject = model if isinstance(model, Subject) else load_subject(model, tokenizer, trust_remote_code)
    subject.require_lm_head("the logit/tuned lens" if lenses else "neuron decoding")
    for name, v, lo in (("steps", steps, 0), ("train_tokens", train_tokens, 8), ("eval_tokens", eval_tokens, 8),
                        ("batch_tokens", batch_tokens, 1), ("checkpoint_every", checkpoint_every, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise LayerscopeError(f"{name} must be an integer >= {lo}, got {v!r}")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and subject.model_dir is not None:
        from layerscope.outputs import is_inside

        if is_inside(out_dir, subject.model_dir):
            raise LayerscopeError(f"output {out_dir} is inside the source model directory; choose another --out")
    L = subject.num_layers
    res = LensResult(model_id=subject.model_id, model_family=subject.parts.family,
                     weights_sha256=subject.weights_sha256, num_layers=L, layer_names=layer_names(L),
                     created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    res.options = {"steps": steps, "train_tokens": train_tokens, "eval_tokens": eval_tokens, "seq_len": seq_len,
                   "batch_tokens": batch_tokens, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                   "optimizer": "AdamW, linear warmup 10 steps then linear decay to 10%",
                   "objective": "sum over layers of KL(final || tuned lens), minibatch mean"}
    if lenses:
        if resume and (out_dir is None or not (out_dir / f"{CHECKPOINT}.json").is_file()):
            raise LayerscopeError(f"--resume: no checkpoint in {out_dir} (expected {CHECKPOINT}.json and "
                                  f"{CHECKPOINT}.safetensors)")
        head = LensHead(subject.parts)
        t1 = time.perf_counter()
        train, tsrc = cache_states(subject, train_data, n_tokens=train_tokens, seq_len=seq_len,
                                   split="calibration", seed=seed)
        res.timings["cache_train"] = time.perf_counter() - t1
        meta = {"model_id": subject.model_id, "weights_sha256": subject.weights_sha256, "num_layers": L,
                "d_model": int(train.shape[-1]), "train_tokens": int(train.shape[1]), "seq_len": seq_len,
                "seed": seed, "data": tsrc, "batch_tokens": batch_tokens, "lr": lr, "steps": steps,
                "weight_decay": weight_decay}
        show = None
        if progress:
            def show(done: int, total: int, kl: float) -> None:
                if done % 10 == 0 or done == total:
                    print(f"\rtuned lens: step {done}/{total}, mean KL {kl:.3f}", end="" if done < total else "\n",
                          file=sys.stderr, flush=True)
        t2 = time.perf_counter()
        translators, curve, start, reached = train_translators(
            head, train, steps=steps, lr=lr, weight_decay=weight_decay, batch_tokens=batch_tokens, seed=seed,
            checkpoint_dir=out_dir, checkpoint_every=checkpoint_every, resume=resume, meta=meta, stop_at=stop_at,
            progress=show)
        res.timings["train"] = time.perf_counter() - t2
        del train
        t3 = time.perf_counter()
        ev, esrc = cache_states(subject, eval_data, n_tokens=eval_tokens, seq_len=seq_len, split="evaluation",
                                seed=seed + 1)
        scores = evaluate_lenses(head, ev, translators)
        res.timings["evaluate"] = time.perf_counter() - t3
        res.logit_kl, res.tuned_kl = scores["logit_kl"], scores["tuned_kl"]
        res.logit_top1, res.tuned_top1 = scores["logit_top1"], scores["tuned_top1"]
        res.steps, res.resumed_from, res.curve = reached, start, curve
        res.train_tokens, res.eval_tokens = int(meta["train_tokens"]), int(ev.shape[1])
        res.train_source, res.eval_source = tsrc, esrc
        tl = TunedLens(translators, head, dict(meta, steps=res.steps,
                                                 eval_logit_kl=res.logit_kl, eval_tuned_kl=res.tuned_kl))
        res.tuned_lens = tl
        if out_dir is not None:
            st, _ = tl.save(out_dir)
            res.artefact = str(st)
        if start >= steps and resume:
            res.notes.append(f"checkpoint already at step {start} >= {steps}: no further training")
        if reached < steps:
            res.notes.append(f"stopped at step {reached} of {steps}; continue with resume")
    if neurons is not None or promote:
        from layerscope.analysis.neurons import neuron_report

        t4 = time.perf_counter()
        res.neurons = neuron_report(subject, layers=neurons, promote=promote, top_k=top_k)
        res.timings["neurons"] = time.perf_counter() - t4
    res.timings["total"] = time.perf_counter() - t0
    return res


# =========================================================================== HTML


