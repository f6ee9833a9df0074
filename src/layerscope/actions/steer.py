"""Steering at the depth that knows: add a sentiment direction to the residual stream and measure it.

The steering vector at layer l (0 = embeddings, l = output of block l-1) is the difference of
class means, positive minus negative, of the mean-pooled layer-l states of the probe sentences
(activation addition with a mean-difference vector; Turner et al. 2023, Rimsky et al. 2024).  It
is added, scaled to ``alpha`` times the typical residual norm at that layer (mean L2 norm of real
tokens, first position excluded), to every position of the residual stream: for scoring as an
edit of the block-sequential engine (`BlockRunner.stream(edits=...)`), for generation (which needs
transformers' KV cache) by the same addition in a forward hook (`steering`).  By default the layer is the sentiment probe's concept depth (see
`layerscope.probe`), falling back to the best probe layer when no depth is found.

Effect measures:
* logit margin: on a fixed list of neutral prompts, ``log P(positive words) - log P(negative
  words)`` for the next token (probability mass summed over single-token words such as " good",
  " great" vs " bad", " terrible").  Effect = steered minus unsteered margin, per prompt; reported
  as mean, standard deviation over prompts and a 95% bootstrap interval.
* compared against the same recipe at every other layer (vector recomputed there, same relative
  alpha) and against random directions of equal norm at the chosen layer (several seeds).
* optionally (`generate_tokens > 0`): greedy continuations of the prompts, scored by the sentiment
  probe of the chosen layer (unsteered model): mean P(positive).
"""
from __future__ import annotations

import datetime as _dt
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from layerscope.errors import LayerscopeError
from layerscope.evaluation.steer_effect import effect_stats, sentiment_margin, word_ids
from layerscope.results import Result

DEFAULT_PROMPTS = (
    "I watched the movie yesterday and it was",
    "The food at this restaurant is",
    "My experience with this product has been",
    "The weather this weekend will be",
    "I think the new policy is",
    "The hotel room was",
    "Honestly, the book is",
    "The service we received was",
    "Today at work, everything felt",
    "The concert last night was",
    "This phone's battery is",
    "Overall, I would describe the trip as",
)
POSITIVE_WORDS = (" good", " great", " excellent", " wonderful", " amazing", " fantastic", " perfect", " lovely")
NEGATIVE_WORDS = (" bad", " terrible", " awful", " horrible", " poor", " disappointing", " boring", " worst")


# =========================================================================== hook


@contextmanager
def steering(parts, layer: int, vector: torch.Tensor | None) -> Iterator[None]:
    """Add `vector` [d] to the residual stream at `layer` (all positions) while the context is open.

    Layer 0 is the input of block 0; layer l >= 1 is the output of block l-1.  The hook runs before
    any other hook on that block, so observers see the steered state.
    """
    L = parts.num_layers
    if not 0 <= layer <= L:
        raise LayerscopeError(f"layer {layer} is out of range: the model has layers 0..{L}")
    if vector is None:
        yield
        return
    handle = None
    try:
        if layer == 0:
            def pre(module, args, kwargs):
                if args:
                    h = args[0]
                    return (h + vector.to(h.dtype).to(h.device),) + tuple(args[1:]), kwargs
                h = kwargs["hidden_states"]
                return args, dict(kwargs, hidden_states=h + vector.to(h.dtype).to(h.device))

            handle = parts.blocks[0].register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
        else:
            def post(module, args, output):
                if isinstance(output, tuple):
                    h = output[0]
                    return (h + vector.to(h.dtype).to(h.device),) + tuple(output[1:])
                return output + vector.to(output.dtype).to(output.device)

            handle = parts.blocks[layer - 1].register_forward_hook(post, prepend=True)
        yield
    finally:
        if handle is not None:
            handle.remove()


def mean_difference(features: np.ndarray, labels: Sequence[str], positive: str = "positive",
                    negative: str = "negative") -> np.ndarray:
    """[L+1, d]: mean(positive) - mean(negative) per layer of pooled features [L+1, N, d]."""
    y = np.asarray(labels)
    if not (y == positive).any() or not (y == negative).any():
        raise LayerscopeError(f"steering needs examples of both '{positive}' and '{negative}'")
    return features[:, y == positive].mean(1) - features[:, y == negative].mean(1)


def random_like(vector: torch.Tensor, seed: int) -> torch.Tensor:
    """A random Gaussian direction with exactly the norm of `vector`."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(vector.shape, generator=g, dtype=torch.float64)
    return (r / r.norm() * vector.double().norm()).to(vector.dtype)


# =========================================================================== measures


@torch.no_grad()
def generate(subject, prompts: Sequence[str], n_tokens: int, layer: int, vector: torch.Tensor | None) -> list[str]:
    """Greedy continuations (one prompt at a time, no padding), with the steering hook if `vector`."""
    from layerscope.analysis.features import pad_id_of

    tok = subject.tokenizer
    dev = next(subject.model.parameters()).device
    outs = []
    with steering(subject.parts, layer, vector):
        for p in prompts:
            ids = torch.tensor([tok(p, add_special_tokens=True)["input_ids"]], device=dev)
            gen = subject.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                                         do_sample=False, pad_token_id=pad_id_of(tok))
            outs.append(tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    return outs


# =========================================================================== API


@dataclass
class SteerResult(Result):
    kind = "layerscope.steer"

    model_id: str
    model_family: str
    weights_sha256: str | None
    num_layers: int
    layer: int
    layer_reason: str
    alpha: float
    vector_norm: float
    residual_norm: float
    prompts: list[str]
    positive_words: list[str]
    negative_words: list[str]
    baseline_margin: list[float]
    chosen: dict
    chosen_negative: dict
    layers: dict[int, dict]
    random: dict
    probe: dict | None = None
    generation: dict | None = None
    options: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    created: str = ""
    vectors: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        from layerscope import __version__
        from layerscope.analysis.probes import _jsonable

        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("vectors", "timings")}
        d["layers"] = {str(k): v for k, v in self.layers.items()}
        d["kind"] = "layerscope.steer"
        d["timings_s"] = {k: round(v, 3) for k, v in self.timings.items()}
        d["layerscope_version"] = __version__
        d["layer_convention"] = "layer 0 = embeddings (input of block 0); layer l = output of block l-1"
        return _jsonable(d)

    @classmethod
    def summary_of(cls, d: dict) -> str:
        c, r = d["chosen"], d["random"]
        layers = {int(k): v for k, v in d["layers"].items()}
        lines = [f"{d['model_id']}: steering at layer {d['layer']} ({d['layer_reason']}), alpha {d['alpha']} "
                 f"(vector norm {d['vector_norm']:.2f} = alpha x residual norm {d['residual_norm']:.2f})",
                 f"  margin shift at layer {d['layer']}: {c['mean']:+.3f} nats (sd {c['std']:.3f} over "
                 f"{len(d['prompts'])} prompts, 95% CI [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]); "
                 f"-alpha: {d['chosen_negative']['mean']:+.3f}",
                 f"  random vectors of equal norm ({len(r['per_seed'])} seeds): mean {r['mean']:+.3f}, "
                 f"sd {r['std']:.3f}, max |shift| {r['max_abs']:.3f}"]
        best = max(layers, key=lambda k: layers[k]["mean"])
        lines.append(f"  other layers: largest shift {layers[best]['mean']:+.3f} at layer {best}; "
                     + ", ".join(f"{k}:{v['mean']:+.2f}" for k, v in sorted(layers.items())))
        if d['generation']:
            lines.append("  generated text, probe P(positive): " + ", ".join(
                f"{k} {v['p_positive_mean']:.3f}" for k, v in d['generation']["conditions"].items()))
        return "\n".join(lines)

    @classmethod
    def table_of(cls, d: dict):
        from layerscope.report.extras import extras_table

        n = (d.get("options") or {}).get("n")
        return extras_table({"steer": d}, d, source=f"{len(d['prompts'])} neutral prompts; direction from {n} labelled sentences")


def _parse_compare(spec: Any, L: int) -> list[int]:
    if spec is None or spec == "all":
        return list(range(L + 1))
    if isinstance(spec, str) and spec.startswith("every:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise LayerscopeError(f"bad --compare '{spec}' (use all, every:N or a comma list)") from None
        if k < 1:
            raise LayerscopeError("every:N needs N >= 1")
        return sorted(set(range(0, L + 1, k)) | {L})
    if isinstance(spec, str):
        try:
            spec = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise LayerscopeError(f"bad --compare '{spec}' (use all, every:N or a comma list)") from None
    out = []
    for x in spec:
        if not 0 <= int(x) <= L:
            raise LayerscopeError(f"layer {x} is out of range: the model has layers 0..{L}")
        out.append(int(x))
    return sorted(set(out))


def steer(
    model: Any = None,
    layer: int | None = None,
    alpha: float = 0.25,
    *,
    data: Any = None,
    positive: str = "positive",
    negative: str = "negative",
    text_field: str = "text",
    label_field: str = "label",
    n: int = 2000,
    seeds: int = 5,
    compare: Any = "all",
    prompts: Sequence[str] | None = None,
    positive_words: Sequence[str] = POSITIVE_WORDS,
    negative_words: Sequence[str] = NEGATIVE_WORDS,
    generate_tokens: int = 0,
    batch_size: int = 32,
    precision: str = "auto",
    tokenizer: Any = None,
    seed: int = 0,
    progress: bool = False,
    trust_remote_code: bool = False,
    plan: Any = None,
) -> SteerResult:
    """Steer `model` with the positive-minus-negative sentiment direction at `layer` and measure the effect.

    layer: residual layer 0..L (None: the sentiment probe's concept depth). alpha: added vector norm
    as a multiple of the typical residual norm at that layer. data: None (VADER sentences, balanced
    sample of `n`) or labelled texts as accepted by `layerscope.probe` whose labels include
    `positive` and `negative` (other labels are ignored).
    """
    if plan is not None:  # a SteerPlan (or plan file) says all of it
        from layerscope.plans.steer import SteerPlan

        plan = SteerPlan.from_file(plan) if not isinstance(plan, SteerPlan) else plan
        layer, alpha, data, n, seeds, compare, generate_tokens, seed = (
            plan.layer, plan.alpha, plan.data, plan.n, plan.seeds, plan.compare, plan.generate_tokens, plan.seed)
        positive, negative, text_field, label_field, precision = (
            plan.positive, plan.negative, plan.text_field, plan.label_field, plan.precision)
    from layerscope.analysis.features import collect_features
    from layerscope.analysis.probe_fit import fit_probe
    from layerscope.analysis.probes import (
        _as_labelled,
        _progress_printer,
        probe_concept,
    )
    from layerscope.data.labelled import (
        LabelledTexts,
        balanced_subsample,
        check_labels,
        concept_data,
        sentiment_sample,
    )
    from layerscope.model.subject import Subject, load_subject

    t0 = time.perf_counter()
    subject = model if isinstance(model, Subject) else load_subject(model, tokenizer, trust_remote_code)
    subject.require_lm_head("steering")
    L = subject.num_layers
    if layer is not None:
        layer = subject.check_layer(layer)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise LayerscopeError(f"alpha must be a finite number, got {alpha!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise LayerscopeError(f"seeds must be a positive integer, got {seeds!r}")
    compare_layers = _parse_compare(compare, L)
    prompts = list(prompts or DEFAULT_PROMPTS)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise LayerscopeError("prompts must be non-empty strings")
    pos_ids, pos_skip = word_ids(subject.tokenizer, positive_words)
    neg_ids, neg_skip = word_ids(subject.tokenizer, negative_words)
    notes = []
    if pos_skip or neg_skip:
        notes.append(f"words that are not single tokens were skipped: {pos_skip + neg_skip}")
    if not pos_ids or not neg_ids:
        raise LayerscopeError("no positive or no negative word is a single token for this tokenizer")

    timings: dict[str, float] = {}
    if data is None:
        data = concept_data("sentiment", sentiment_sample(n, seed))
    else:
        full = _as_labelled(data, text_field, label_field)
        keep = [i for i, lab in enumerate(full.labels) if lab in (positive, negative)]
        if len({full.labels[i] for i in keep}) < 2:
            raise LayerscopeError(f"steering data needs labels '{positive}' and '{negative}' "
                                  f"(found: {', '.join(sorted(set(full.labels))[:8])})")
        sub = balanced_subsample([full.labels[i] for i in keep], n, seed)
        data = LabelledTexts([full.texts[keep[i]] for i in sub],
                             ["positive" if full.labels[keep[i]] == positive else "negative" for i in sub],
                             "sentiment", full.source)
    check_labels(data.labels, data.name)
    feats = collect_features(subject, data.texts, poolings=("mean",), batch_size=batch_size, precision=precision,
                             progress=_progress_printer(progress, "features"))
    timings["features"] = feats.wall_time_s
    X = feats.pooled["mean"]
    probe_res = None
    reason = "given"
    if layer is None:
        t1 = time.perf_counter()
        cres = probe_concept(feats, data, seed=seed)
        timings["probe"] = time.perf_counter() - t1
        pr = cres.poolings["mean"]
        probe_res = {"accuracy": pr.accuracy, "control": pr.control, "depth": pr.depth, "best_layer": pr.best_layer}
        if pr.depth is not None:
            layer, reason = pr.depth, f"sentiment concept depth ({cres.depth_fraction:.0%} of best probe accuracy)"
        else:
            layer, reason = pr.best_layer, "best sentiment probe layer (no concept depth found)"
    diffs = torch.from_numpy(mean_difference(X, data.labels)).float()  # [L+1, d]
    norms = torch.from_numpy(feats.token_norm).float()

    def vec(at: int) -> torch.Tensor:
        d = diffs[at]
        nrm = d.norm()
        if nrm == 0:
            raise LayerscopeError(f"the class means coincide at layer {at}: no steering direction")
        return d / nrm * (alpha * norms[at])

    t2 = time.perf_counter()
    base = sentiment_margin(subject, prompts, pos_ids, neg_ids)
    v = vec(layer)
    chosen = effect_stats(sentiment_margin(subject, prompts, pos_ids, neg_ids, layer, v) - base, seed)
    chosen_neg = effect_stats(sentiment_margin(subject, prompts, pos_ids, neg_ids, layer, -v) - base, seed)
    per_layer = {}
    for at in compare_layers:
        m = chosen if at == layer else effect_stats(
            sentiment_margin(subject, prompts, pos_ids, neg_ids, at, vec(at)) - base, seed)
        per_layer[at] = {k: m[k] for k in ("mean", "std", "ci_low", "ci_high", "cohens_dz")}
        per_layer[at]["vector_norm"] = float(vec(at).norm())
    rand_effects, rand_stats = [], []
    for s in range(seeds):
        r = random_like(v, seed * 7919 + s)
        st = effect_stats(sentiment_margin(subject, prompts, pos_ids, neg_ids, layer, r) - base, seed)
        rand_stats.append({"seed": seed * 7919 + s, "mean": st["mean"], "std": st["std"],
                           "vector_norm": float(r.norm())})
        rand_effects.append(st["mean"])
    ra = np.asarray(rand_effects)
    random_summary = {"mean": float(ra.mean()), "std": float(ra.std(ddof=1)) if len(ra) > 1 else 0.0,
                      "max_abs": float(np.abs(ra).max()), "per_seed": rand_stats,
                      "chosen_over_random_sd": (float((chosen["mean"] - ra.mean()) / ra.std(ddof=1))
                                                if len(ra) > 1 and ra.std(ddof=1) > 0 else None)}
    timings["margins"] = time.perf_counter() - t2

    generation = None
    if generate_tokens:
        t3 = time.perf_counter()
        probe_at = fit_probe(X[layer], np.asarray(data.labels), seed=seed)
        pos_col = list(probe_at.classes_).index("positive")
        conds: dict[str, torch.Tensor | None] = {"unsteered": None, f"+alpha@{layer}": v, f"-alpha@{layer}": -v}
        for s in range(min(seeds, 3)):
            conds[f"random{s}@{layer}"] = random_like(v, seed * 7919 + s)
        generation = {"tokens": generate_tokens, "probe_layer": layer, "conditions": {}}
        for name, vv in conds.items():
            texts = generate(subject, prompts, generate_tokens, layer, vv)
            f = collect_features(subject, [t if t.strip() else "." for t in texts], poolings=("mean",),
                                 batch_size=batch_size, precision=feats.precision)
            p = probe_at.predict_proba(f.pooled["mean"][layer])[:, pos_col]
            generation["conditions"][name] = {"p_positive_mean": float(p.mean()),
                                              "p_positive_std": float(p.std(ddof=1)) if len(p) > 1 else 0.0,
                                              "p_positive": [round(float(x), 4) for x in p], "texts": texts}
        timings["generation"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    return SteerResult(
        model_id=subject.model_id, model_family=subject.parts.family, weights_sha256=subject.weights_sha256,
        num_layers=L, layer=int(layer), layer_reason=reason, alpha=float(alpha), vector_norm=float(v.norm()),
        residual_norm=float(norms[layer]), prompts=prompts,
        positive_words=[w for w in positive_words if w not in pos_skip],
        negative_words=[w for w in negative_words if w not in neg_skip],
        baseline_margin=[round(float(x), 5) for x in base], chosen=chosen, chosen_negative=chosen_neg,
        layers=per_layer, random=random_summary, probe=probe_res, generation=generation,
        options={"plan": plan.to_dict() if plan is not None else None, "n": n, "seeds": seeds, "feature_precision": feats.precision, "compare": compare_layers, "seed": seed, "generate_tokens": generate_tokens,
                 "margin": "log sum P(positive words) - log sum P(negative words), next token after the prompt",
                 "vector": "mean(positive) - mean(negative) of mean-pooled states, scaled to alpha x mean token norm"},
        timings=timings, notes=notes, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        vectors=diffs.numpy(),
    )


# =========================================================================== HTML


