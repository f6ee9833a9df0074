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
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from layerscope.analysis.tuned_lens import (
    CHECKPOINT,
    LensHead,
    Translators,
    TunedLens,
    train_translators,
)
from layerscope.errors import LayerscopeError
from layerscope.results import Result

# =========================================================================== lens head


# =========================================================================== translators


# =========================================================================== data


@torch.no_grad()
def cache_states(subject, data: Any, *, n_tokens: int, seq_len: int, split: str, seed: int,
                 batch_size: int = 4) -> tuple[torch.Tensor, str]:
    """Residual states [L+1, n_tokens, d] at randomly sampled positions (never position 0)."""
    from layerscope.data.windows import prepare_tokens
    from layerscope.engine.runner import BlockRunner
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
    # the sampled positions of every window, drawn in window order from one generator
    picks = [(torch.arange(x.shape[0])[:, None].expand(x.shape[0], per_window),
              torch.stack([1 + torch.randperm(seq_len - 1, generator=g)[:per_window].sort().values
                           for _ in range(x.shape[0])])) for x in ids.split(batch_size)]

    def grab(layer: int, b: int, h: torch.Tensor) -> None:
        rows, pos = picks[b]
        chunks[layer].append(h[rows, pos].reshape(-1, h.shape[-1]).float().cpu())

    BlockRunner(subject.parts, []).stream(grab, inputs=({"input_ids": x, "attention_mask": torch.ones_like(x)}
                                                        for x in ids.split(batch_size)))
    states = torch.stack([torch.cat(c)[:n_tokens] for c in chunks])
    if not torch.isfinite(states).all():
        from layerscope.errors import NumericalError

        raise NumericalError("non-finite hidden states (NaN/Inf) while caching lens training data")
    return states, str(source)


# =========================================================================== evaluation


@torch.no_grad()
def evaluate_lenses(head: LensHead, states: torch.Tensor, translators: Translators | None) -> dict[str, list[float]]:
    """Per layer 0..L: KL(final || lens) in nats and top-1 agreement, for logit and tuned lens.

    Vocabulary-bounded (evaluation/scoring.py): positions in chunks, the final distribution kept
    without its vocabulary axis.
    """
    from layerscope.evaluation.scoring import OutputHead, ReferenceScorer

    Lp1 = states.shape[0]
    L = Lp1 - 1
    ref = ReferenceScorer(OutputHead.of(head.parts), states[L])
    out: dict[str, list[float]] = {k: [0.0] * Lp1 for k in ("logit_kl", "tuned_kl", "logit_top1", "tuned_top1")}
    for layer in range(Lp1):
        logit = ref.score_hidden(states[layer])
        tuned = ref.score_hidden(translators.translate(layer, states[layer])) \
            if translators is not None and layer < L else logit
        for name, sc in (("logit", logit), ("tuned", tuned)):
            out[f"{name}_kl"][layer] = sc.kl / sc.n
            out[f"{name}_top1"][layer] = sc.top1 / sc.n
    return out


# =========================================================================== training


# =========================================================================== API


@dataclass
class LensResult(Result):
    kind = "layerscope.lens"

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

    @classmethod
    def summary_of(cls, d: dict) -> str:
        ln = d.get("lens")
        if not ln:
            return f"{d['model_id']}: neuron decoding only (no lenses)"
        lines = [f"{d['model_id']}: tuned lens {ln['steps']} steps on {ln['train_tokens']} tokens, "
                 f"evaluated on {ln['eval_tokens']} held-out tokens",
                 f"{'layer':>5} {'logit KL':>9} {'tuned KL':>9} {'logit top1':>10} {'tuned top1':>10}"]
        for i in range(len(ln["logit_kl"])):
            lines.append(f"{i:>5} {ln['logit_kl'][i]:>9.3f} {ln['tuned_kl'][i]:>9.3f} "
                         f"{ln['logit_top1'][i]:>10.3f} {ln['tuned_top1'][i]:>10.3f}")
        return "\n".join(lines)

    @classmethod
    def table_of(cls, d: dict):
        from layerscope.report.extras import extras_table

        ln = d.get("lens") or {}
        source = f"train {ln['train_source']}; evaluation {ln['eval_source']}" if ln.get("train_source") else None
        return extras_table({"lens": d.get("lens"), "neurons": d.get("neurons")}, d, source=source)


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


