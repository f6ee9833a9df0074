"""Leave-one-out ablation: the damage done by taking one block, attention sublayer or MLP sublayer out.

For every unit u the model is run without u and compared with the full model on the same tokens:

* ``ablation_kl``    -- mean over scored positions of KL(p_full || p_without_u) of the next-token
  distributions (nats);
* ``ablation_dloss`` -- mean next-token NLL without u minus the full model's mean NLL (nats);
* ``ablation_dppl``  -- exp(NLL without u) - exp(NLL of the full model).

Scored positions: every position of every window that has a next token (T-1 per window of T).

Data (option ``ablation_data``): ``"evaluation"`` -- held-out tokens, the evaluation split of
``ablation_dataset`` (default Wikipedia), ``ablation_tokens`` tokens (default 2048) in windows of
``ablation_seq_len`` (default: the scan's sequence length); this needs the model's tokenizer
(option ``tokenizer``, else loaded from the model's directory). ``"calibration"`` -- the scan's own
calibration batches. ``ablation_ids`` (an int tensor [N, T]) overrides both. Unset (the default):
"evaluation" when a tokenizer is available, else "calibration" (e.g. an in-memory model scanned on
token ids). The data actually used is recorded in every column's details["data"].

Prefix reuse. Removing block i leaves blocks 0..i-1 unchanged, so the input of every block is cached
once (one full pass) and "skip block i" starts from block i's cached input and runs blocks
i+1..L-1 and the head: sum_i (L-1-i) = L(L-1)/2 block evaluations instead of L(L-1) for L full
reruns, with the same numbers (`bench/ablation.py` checks both claims). A sublayer ablation runs
block i from its cached input with the sublayer's contribution zeroed, then blocks i+1..L-1.

Zeroing a sublayer. A forward hook replaces the output of the attention module (its output[0]) or
of the MLP module by zeros, so the residual stream receives nothing from it:

* pre-LN families (Llama, Qwen, Mistral, Phi-3, GPT-2, GPT-NeoX, OPT, Falcon): the module output is
  exactly what is added to the residual stream. Biases of the output projections (GPT-2, OPT, ...)
  are part of the module output and are removed with it -- the sublayer is taken out completely,
  not just its input-dependent part.
* Gemma 2/3 apply a norm after the sublayer (post_attention_layernorm / post_feedforward_layernorm)
  before the residual add; RMSNorm(0) = 0, so zeroing the module output before that norm also
  removes the contribution exactly.
* post-LN encoders (BERT-like, where the "attention" module already contains the residual add and
  LayerNorm) zero the output projection (attention.output.dense / output.dense) instead; those
  models have no causal LM head, so ablation is reported as unavailable for them anyway.

Greedy variant (option ``ablation_greedy`` = number of steps, default 0 = off): remove the block
whose removal costs least (by ``ablation_greedy_by``: "kl" or "dloss"), re-score every remaining
block with the removed ones gone, repeat. The order and the curve (KL / dloss after each removal)
are stored in the block column's details under "greedy".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from layerscope.checkpoint import ids_digest
from layerscope.engine.removal import (
    blocks_removed,
    check_unit,
    sublayers_zeroed,
)
from layerscope.errors import LayerscopeError
from layerscope.evaluation.scoring import OutputHead, ReferenceScorer
from layerscope.metrics.base import Column, Metric

UNITS = ("block", "attention", "mlp")
DEFAULT_TOKENS = 2048
DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH = 2

REFERENCE = ("leave-one-out ablation, e.g. Men et al. 2024 (ShortGPT), Gromov et al. 2024, "
             "He et al. 2024 (What Matters in Transformers?)")


# --------------------------------------------------------------------------- zeroing a sublayer


# --------------------------------------------------------------------------- scoring
class Reference(ReferenceScorer):
    """The full model's next-token distributions on one batch; scores a changed model against them.

    `score_hidden(h)` takes the final hidden state of the changed model (before the final norm),
    `score_logits(logits)` its logits; both return (sum over positions of KL(full || changed),
    sum of NLL, number of positions), sums in float64. Vocabulary-bounded: see
    layerscope.evaluation.scoring (positions in chunks, the reference kept without its vocabulary axis).
    """

    def __init__(self, runner, input_ids: torch.Tensor, h_final: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None, head: OutputHead | None = None):
        if head is None and runner is not None:
            head = OutputHead.of(runner.parts)
        super().__init__(head, h_final, input_ids, logits=logits, top1=False)


def _run(runner, batch, h: torch.Tensor, start: int, skip: Sequence[int] = ()) -> torch.Tensor:
    for j in range(start, runner.parts.num_layers):
        if j not in skip:
            h = runner.forward_block(j, h, batch)
    return h


def _cache_inputs(runner, batch, skip: Sequence[int] = ()) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Inputs of every block that is not skipped, and the final hidden state, in one pass."""
    cache: dict[int, torch.Tensor] = {}
    h = batch.first_hidden
    for j in range(runner.parts.num_layers):
        if j in skip:
            continue
        cache[j] = h
        h = runner.forward_block(j, h, batch)
    return cache, h


@dataclass
class AblationResult:
    """Sums per unit and block, turned into means by `kl()`, `dloss()`, `dppl()`."""

    num_layers: int
    units: tuple[str, ...]
    base_nll_sum: float = 0.0
    positions: int = 0
    kl_sum: dict[str, list[float]] = field(default_factory=dict)
    nll_sum: dict[str, list[float]] = field(default_factory=dict)
    block_evaluations: int = 0
    naive_block_evaluations: int = 0  # what the same numbers cost with one full rerun per ablated unit
    head_evaluations: int = 0
    wall_time_s: float = 0.0
    greedy: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for u in self.units:
            self.kl_sum.setdefault(u, [0.0] * self.num_layers)
            self.nll_sum.setdefault(u, [0.0] * self.num_layers)

    @property
    def base_nll(self) -> float:
        return self.base_nll_sum / self.positions

    def kl(self, unit: str) -> list[float]:
        return [s / self.positions for s in self.kl_sum[unit]]

    def nll(self, unit: str) -> list[float]:
        return [s / self.positions for s in self.nll_sum[unit]]

    def dloss(self, unit: str) -> list[float]:
        return [v - self.base_nll for v in self.nll(unit)]

    def dppl(self, unit: str) -> list[float | None]:
        base = _exp(self.base_nll)
        return [None if _exp(v) is None or base is None else _exp(v) - base for v in self.nll(unit)]


_SUMS = ("base_nll_sum", "positions", "kl_sum", "nll_sum", "block_evaluations", "naive_block_evaluations",
         "head_evaluations")


def _exp(v: float) -> float | None:
    return math.exp(v) if v < 700 else None


@torch.no_grad()
def leave_one_out(runner, units: Sequence[str] = UNITS, layers: Sequence[int] | None = None,
                  checkpoint: Any = None) -> AblationResult:
    """Leave-one-out ablation of every block / attention / MLP sublayer with prefix reuse.

    `runner` is a captured BlockRunner; its batches are the evaluated tokens. A `checkpoint` saves the sums
    after every batch; a resumed run continues from the first unfinished one (identical numbers).
    """
    parts = runner.parts
    L = parts.num_layers
    unknown = set(units) - set(UNITS)
    units = tuple(u for u in UNITS if u in set(units))
    if unknown or not units:
        raise LayerscopeError(f"ablation units must be among {', '.join(UNITS)} (got {', '.join(sorted(unknown)) or 'none'})")
    layers = list(range(L)) if layers is None else list(layers)
    res = AblationResult(num_layers=L, units=units)
    head = OutputHead.of(parts)  # one logits buffer for every unit
    t0 = time.perf_counter()
    state = dict(checkpoint.get("sums") or {}) if checkpoint is not None else {}
    start = int(state.pop("batches_done", 0))
    for k, v in state.items():
        setattr(res, k, v)
    for b, batch in enumerate(runner.batches[start:], start):
        cache, h_final = _cache_inputs(runner, batch)
        res.block_evaluations += L
        res.naive_block_evaluations += L
        ref = Reference(runner, batch.inputs["input_ids"], h_final, head=head)
        res.head_evaluations += 1
        res.base_nll_sum += ref.nll
        res.positions += ref.n
        for i in layers:
            for unit in units:
                if unit == "block":
                    h = _run(runner, batch, cache[i], i + 1)
                    res.block_evaluations += L - 1 - i
                    res.naive_block_evaluations += L - 1
                else:
                    with sublayers_zeroed(parts, unit, [i]):
                        h = runner.forward_block(i, cache[i], batch)
                    h = _run(runner, batch, h, i + 1)
                    res.block_evaluations += L - i
                    res.naive_block_evaluations += L
                kl, nll, _ = ref.score_hidden(h)
                res.head_evaluations += 1
                res.kl_sum[unit][i] += kl
                res.nll_sum[unit][i] += nll
        del cache, ref
        if checkpoint is not None:
            checkpoint.put("sums", {"batches_done": b + 1, **{k: getattr(res, k) for k in _SUMS}})
    res.wall_time_s = time.perf_counter() - t0
    return res


@torch.no_grad()
def naive_leave_one_out(parts, batches: Sequence[dict[str, torch.Tensor]], units: Sequence[str] = ("block",)) -> AblationResult:
    """Reference implementation: one full forward of the model per ablated unit (no prefix reuse).

    A block is removed from the model's block list; a sublayer is zeroed by the same hook as in
    `leave_one_out`. Scoring is shared with `leave_one_out` (`Reference.score_logits`). Used by
    bench/ablation.py to check that prefix reuse gives the same numbers.
    """
    model = parts.model
    L = parts.num_layers
    units = tuple(u for u in UNITS if u in set(units))
    res = AblationResult(num_layers=L, units=units)
    device = next(model.parameters()).device
    t0 = time.perf_counter()

    def logits(inputs):
        return model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False).logits

    for inputs in batches:
        ref = Reference(None, inputs["input_ids"].to(device), logits=logits(inputs))
        res.block_evaluations += L
        res.naive_block_evaluations += L
        res.base_nll_sum += ref.nll
        res.positions += ref.n
        for i in range(L):
            for unit in units:
                if unit == "block":
                    with blocks_removed(model, [i]):
                        lg = logits(inputs)
                    res.block_evaluations += L - 1
                else:
                    with sublayers_zeroed(parts, unit, [i]):
                        lg = logits(inputs)
                    res.block_evaluations += L
                kl, nll, _ = ref.score_logits(lg)
                res.head_evaluations += 1
                res.kl_sum[unit][i] += kl
                res.nll_sum[unit][i] += nll
    res.naive_block_evaluations = res.block_evaluations
    res.wall_time_s = time.perf_counter() - t0
    return res


@torch.no_grad()
def greedy_removal(runner, steps: int, by: str = "kl", unit: str = "block",
                   progress: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """Greedy ablation, the one used everywhere: remove the unit whose removal costs least, re-score
    the remaining units with the removed ones gone, repeat `steps` times.

    by: "kl" (KL to the full model) or "dloss" (mean NLL change). Ties go to the lower index.
    Returns {"order", "curve": [{"removed", "kl", "dloss", "nll"}], "by", "unit", "base_nll"}. Each
    step caches the input of every block under the current removals once, so a candidate only
    re-runs the blocks from itself on.
    """
    if by not in ("kl", "dloss"):
        raise LayerscopeError("greedy ablation criterion must be 'kl' or 'dloss'")
    check_unit(unit)
    parts = runner.parts
    L = parts.num_layers
    steps = max(0, min(int(steps), L - 1))
    removed: list[int] = []
    curve: list[dict[str, Any]] = []
    base, n = 0.0, 0
    head = OutputHead.of(parts)
    for step in range(steps):
        cand = [i for i in range(L) if i not in removed]
        kl = dict.fromkeys(cand, 0.0)
        nll = dict.fromkeys(cand, 0.0)
        base, n = 0.0, 0
        for batch in runner.batches:
            cache, h_full = _cache_inputs(runner, batch)
            ref = Reference(runner, batch.inputs["input_ids"], h_full, head=head)
            base, n = base + ref.nll, n + ref.n
            if unit == "block":
                if removed:  # the inputs of the remaining blocks with the removed ones gone
                    cache, _ = _cache_inputs(runner, batch, skip=removed)
                for i in cand:
                    k, l_, _ = ref.score_hidden(_run(runner, batch, cache[i], i + 1, skip=removed))
                    kl[i] += k
                    nll[i] += l_
            else:
                with sublayers_zeroed(parts, unit, removed):
                    cache, _ = _cache_inputs(runner, batch)
                for i in cand:
                    with sublayers_zeroed(parts, unit, [*removed, i]):
                        k, l_, _ = ref.score_hidden(_run(runner, batch, cache[i], i))
                    kl[i] += k
                    nll[i] += l_
        crit = {i: (kl[i] if by == "kl" else nll[i]) for i in cand}
        best = min(cand, key=lambda i: (crit[i], i))
        removed.append(best)
        curve.append({"removed": list(removed), "kl": kl[best] / n, "dloss": (nll[best] - base) / n,
                      "nll": nll[best] / n})
        if progress:
            progress(step + 1, best, nll[best] / n)
    return {"order": removed, "curve": curve, "by": by, "unit": unit, "base_nll": base / n if n else None}


# --------------------------------------------------------------------------- data
def _tokenizer_for(parts, options: dict[str, Any]):
    tok = options.get("tokenizer")
    if tok is not None:
        return tok
    path = getattr(getattr(parts.model, "config", None), "_name_or_path", "") or ""
    if not path:
        return None
    from layerscope.model.loading import load_tokenizer

    local = Path(path)
    return load_tokenizer(path, local if local.is_dir() else None) if local.is_dir() else None


def ablation_runner(ctx) -> tuple[Any, str]:
    """The BlockRunner over the ablation tokens (see the module docstring) and a description."""
    from layerscope.engine.runner import BlockRunner, make_batches

    opts = ctx.options
    parts = ctx.parts
    which = opts.get("ablation_data")
    tok = _tokenizer_for(parts, opts) if which in (None, "evaluation") and opts.get("ablation_ids") is None else None
    if which is None:
        which = "evaluation" if tok is not None or ctx.runner is None else "calibration"
    which = str(which)
    batch_size = int(opts.get("ablation_batch_size", DEFAULT_BATCH))
    ids = opts.get("ablation_ids")
    if ids is not None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise LayerscopeError("ablation_ids must be an integer tensor [sequences, tokens]")
        desc = f"given token ids {tuple(ids.shape)}"
    elif which == "calibration":
        if ctx.runner is None:
            raise LayerscopeError("ablation on calibration data needs the scan's calibration batches")
        why = "" if opts.get("ablation_data") else " (no tokenizer for held-out text)"
        return ctx.runner, f"the scan's calibration batches ({ctx.n_tokens} tokens){why}"
    elif which == "evaluation":
        if tok is None:
            raise LayerscopeError(
                "ablation on held-out text needs the model's tokenizer: pass options={'tokenizer': ...}, "
                "'ablation_ids', or set 'ablation_data' to 'calibration'")
        from layerscope.data.sources import load_texts
        from layerscope.data.windows import tokenize_windows

        dataset = str(opts.get("ablation_dataset", "wikipedia"))
        n_tokens = int(opts.get("ablation_tokens", DEFAULT_TOKENS))
        seq_len = opts.get("ablation_seq_len")
        if seq_len is None:
            seq_len = DEFAULT_SEQ_LEN
            if ctx.runner is not None and ctx.runner.batches:
                seq_len = int(ctx.runner.batches[0].inputs["input_ids"].shape[1])
        ids = tokenize_windows(tok, load_texts(dataset, split="evaluation"), n_tokens=n_tokens, seq_len=int(seq_len))
        desc = f"{dataset}:evaluation, {ids.numel()} tokens in {ids.shape[0]} windows of {ids.shape[1]}"
    else:
        raise LayerscopeError(f"unknown ablation_data '{which}' (use 'evaluation' or 'calibration')")
    batches, _ = make_batches(ids.long(), batch_size)
    runner = BlockRunner(parts, batches)
    runner.capture()
    return runner, desc


# --------------------------------------------------------------------------- the metric
class Ablation(Metric):
    """Leave-one-out ablation of every block, attention sublayer and MLP sublayer (ground truth).

    Columns ablation_kl, ablation_dloss, ablation_dppl for the block, attention and mlp units;
    higher = the model suffers more without the unit = more important. See the module docstring
    for the data, prefix reuse, how sublayers are zeroed and the greedy variant.
    """

    name = "ablation"
    direction = "higher"
    definition = "mean KL(full || model without the unit) of next-token distributions on held-out tokens"
    reference = REFERENCE

    @staticmethod
    def unavailable(parts) -> str | None:
        return None if parts.has_lm_head else "needs a causal LM head (next-token KL and loss)"

    def finish(self) -> list[Column]:
        opts = self.ctx.options
        units = opts.get("ablation_units", UNITS)
        if isinstance(units, str):
            units = [u.strip() for u in units.split(",") if u.strip()]
        runner, desc = ablation_runner(self.ctx)
        ckpt = opts["checkpoint"].scoped("ablation") if opts.get("checkpoint") is not None else None
        if ckpt is not None:  # a resumed run must see the same tokens, units and weights
            ckpt.require_same("inputs", {"data": desc, "units": list(units), "weights": opts.get("weights_sha256"),
                                         "tokens": ids_digest(runner.batches), "greedy": opts.get("ablation_greedy", 0)})
        if opts.get("ray"):  # the same numbers, units fanned out over Ray workers (no per-batch checkpoint)
            from layerscope.metrics.ground_truth.ablation_parallel import leave_one_out_ray

            res = leave_one_out_ray(runner, units, str(opts["ray"]))
        else:
            res = leave_one_out(runner, units, checkpoint=ckpt)
        greedy_steps = int(opts.get("ablation_greedy", 0) or 0)
        greedy = ckpt.get("greedy") if ckpt is not None else None
        if greedy is None and greedy_steps > 0:
            greedy = greedy_removal(runner, greedy_steps, str(opts.get("ablation_greedy_by", "kl")))
            if ckpt is not None:
                ckpt.put("greedy", greedy)
        info = {
            "data": desc,
            "positions_scored": res.positions,
            "base_nll": res.base_nll,
            "base_perplexity": _exp(res.base_nll),
            "block_evaluations": res.block_evaluations,
            "naive_block_evaluations": res.naive_block_evaluations,
            "head_evaluations": res.head_evaluations,
            "wall_time_s": round(res.wall_time_s, 3),
        }
        cols: list[Column] = []
        for unit in res.units:
            extra = dict(info)
            if unit == "block" and greedy is not None:
                extra["greedy"] = greedy
            what = "the block" if unit == "block" else f"the {unit} sublayer (output zeroed)"
            cols += [
                self.column(unit, res.kl(unit), metric="ablation_kl",
                            definition=f"mean KL(full || without {what}) of next-token distributions, nats",
                            **extra),
                self.column(unit, res.dloss(unit), metric="ablation_dloss",
                            definition=f"mean next-token NLL without {what} minus the full model's, nats",
                            **info),
                self.column(unit, res.dppl(unit), metric="ablation_dppl",
                            definition=f"perplexity without {what} minus the full model's perplexity",
                            **info),
            ]
        return cols
