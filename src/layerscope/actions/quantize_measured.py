"""`quantize --by measured` and `--method gptq`: calibration, measured candidate losses (checkpointed,
resumable), the exact per-linear plan, applying it (GPTQ or fake-quant), evaluating it against the
uniform plan at the same budget, and saving the compressed-tensors model."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from layerscope.errors import LayerscopeError

CHECKPOINT_DIR = "checkpoint"
JOINT_TOKENS = 4096  # calibration tokens on which each option's uniform plan is measured (quant_stats)


def calibration_batches(tokenizer, tokens: int, seq_len: int = 512, batch_size: int = 4) -> list[dict]:
    from layerscope.data.sources import load_texts
    from layerscope.data.windows import tokenize_windows
    from layerscope.engine.runner import make_batches

    if tokenizer is None:
        raise LayerscopeError("measured quantization needs the model's tokenizer for calibration text")
    ids = tokenize_windows(tokenizer, load_texts("wikipedia", split="calibration"), n_tokens=tokens,
                           seq_len=min(seq_len, tokens))
    return make_batches(ids, batch_size)[0]


def search_batches(tokenizer, skip_tokens: int, tokens: int, seq_len: int = 512, batch_size: int = 4) -> list[dict]:
    """Calibration windows that follow the first `skip_tokens` (the ones every loss estimate was
    measured on): the search scores its candidate plans on text the estimates have not seen. Scored
    on the same text, a plan that the estimates chose because it fits those tokens measures a gain
    that held-out text does not show (SmolLM2 at 4.25 bpw: −0.011 nats/token on the estimation
    tokens, +0.008 held out)."""
    from layerscope.data.sources import load_texts
    from layerscope.data.windows import tokenize_windows
    from layerscope.engine.runner import make_batches

    seq_len = min(seq_len, skip_tokens)
    skip = max(1, skip_tokens // seq_len)  # the windows calibration_batches gave the estimates
    n = max(1, tokens // seq_len)
    ids = tokenize_windows(tokenizer, load_texts("wikipedia", split="calibration"), n_tokens=(skip + n) * seq_len,
                           seq_len=seq_len)
    return make_batches(ids[skip:], batch_size)[0]


def checkpoint_key(lm, options, tokens: int, seq_len: int, damp: float, act_order: bool,
                   loss_model: str = "token_fisher", joint_tokens: int = JOINT_TOKENS) -> dict:
    return {"weights_sha256": lm.weights_sha256, "model": lm.model_id, "options": [o.to_dict() for o in options],
            "tokens": tokens, "seq_len": seq_len, "damp": damp, "act_order": act_order, "loss_model": loss_model,
            "joint_tokens": joint_tokens}


def measure(lm, parts, options, *, tokens: int, seq_len: int = 512, damp: float = 0.1, act_order: bool = False,
            out: Path | None = None, force: bool = False, resume: bool = False, sources: tuple = (),
            log: Callable[[str], None] = lambda m: None, batches=None, loss_model: str = "token_fisher",
            joint_tokens: int = JOINT_TOKENS):
    """CandidateLosses for every (block linear, option); checkpointed in out/checkpoint when `out` is given."""
    from layerscope.compress.quant_stats import Checkpoint, measure_candidates

    ck_dir = None
    if out is not None:
        from layerscope.outputs import claim_output

        claim_output(out, [CHECKPOINT_DIR], verb="quantize", force=force, sources=sources)
        ck_dir = Path(out) / CHECKPOINT_DIR
    ck = Checkpoint(ck_dir, checkpoint_key(lm, options, tokens, seq_len, damp, act_order, loss_model, joint_tokens))
    batches = batches if batches is not None else calibration_batches(lm.tokenizer, tokens, seq_len)
    log(f"measuring {len(options)} candidates per linear layer on {tokens} calibration tokens"
        + (" (resuming the checkpoint)" if resume else ""))
    res = measure_candidates(parts, batches, options, damp=damp, act_order=act_order, checkpoint=ck,
                             resume=resume, log=log, loss_model=loss_model, joint_tokens=joint_tokens)
    if res.resumed_blocks:
        log(f"resumed: blocks {res.resumed_blocks} taken from the checkpoint")
    return res, batches


def plan_measured(lm, parts, *, budget: float, options, by: str, fmt: str, tokens: int, seq_len: int = 512,
                  damp: float = 0.1, act_order: bool = False, out=None, force=False, resume=False, sources=(),
                  log=lambda m: None, loss_model: str = "token_fisher", search: bool = True,
                  search_tokens: int = JOINT_TOKENS, ray: str | None = None):
    """(plan, state) for --by measured | uniform with any method (gptq included). `search_tokens`:
    calibration tokens each search trial is measured on; `ray`: measure the trials as Ray tasks."""
    from layerscope.plans.allocate import model_layers
    from layerscope.plans.quant_measured import exact_plan, uniform_plan

    layers = model_layers(parts)
    common = dict(fmt=fmt, num_layers=parts.num_layers, blocks_path=parts.blocks_path, method=options[0].method)
    state: dict = {"layers": layers, "options": options, "damp": damp, "act_order": act_order,
                   "tokens": tokens, "seq_len": seq_len}
    if by == "uniform":
        return uniform_plan(layers, options, budget, **common), state
    if by != "measured":
        raise LayerscopeError(f"--method {options[0].method} allocates with --by measured or uniform, not '{by}'")
    losses, batches = measure(lm, parts, options, tokens=tokens, seq_len=seq_len, damp=damp, act_order=act_order,
                              out=out, force=force, resume=resume, sources=sources, log=log, loss_model=loss_model)
    state.update(losses=losses, batches=batches)
    if search:
        from layerscope.plans.quant_measured import measured_search

        if search_tokens < 1:
            raise LayerscopeError(f"--search-tokens must be positive, got {search_tokens}")
        log(f"choosing how far to move from the uniform plan: each candidate plan measured on "
            f"{search_tokens} calibration tokens after the {tokens} of the estimates" + (" (Ray tasks)" if ray else ""))
        held_out = search_batches(lm.tokenizer, tokens, search_tokens, seq_len)
        kw = dict(tokens=search_tokens, hessians=losses.hessians, act_order=act_order)
        if ray:
            from layerscope.actions.quantize_parallel import RayPlanScorer

            scorer = RayPlanScorer(parts, held_out, address=ray, **kw)
        else:
            scorer = PlanScorer(parts, held_out, **kw)
        with scorer:
            plan, trials = measured_search(layers, losses, budget, scorer.many, log=log, **common)
        state["search"] = trials
    else:
        plan = exact_plan(layers, losses, budget, **common)
    state["uniform"] = uniform_plan(layers, options, budget, losses=losses, **common)
    return plan, state


class PlanScorer:
    """Measured ΔNLL (nats/token) of a plan on the first `tokens` tokens of `batches` (`quantize`
    gives it the calibration text after the estimates' tokens, `search_batches`), each (layer, scheme)
    quantized once with the plan's own quantizer and kept (GPTQ with the layer's Hessian from the
    statistics pass): a trust-region search scores several plans that share most layers.
    Memory: the quantized weights of every (layer, scheme) scored."""

    def __init__(self, parts, batches, *, tokens: int, hessians=None, act_order: bool = False):
        from layerscope.compress.quant_stats import leading_batches

        self.parts, self.batches = parts, leading_batches(batches, tokens)
        self.hessians, self.act_order = hessians or {}, act_order
        self.modules = dict(parts.model.named_modules())
        self.cache: dict[tuple, torch.Tensor] = {}
        self.base = self._nll({})

    @torch.no_grad()
    def _nll(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token NLL of each calibration sequence with `weights` swapped in (float64 [sequences])."""
        import torch.nn.functional as F

        saved = {n: self.modules[n].weight.data for n in weights}
        try:
            for n, w in weights.items():
                self.modules[n].weight.data = w
            out = []
            for b in self.batches:
                logits = self.parts.model(**b, use_cache=False).logits
                ids = b["input_ids"]
                nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
                out.append(nll.double().mean(dim=1))
            return torch.cat(out)
        finally:
            for n, w in saved.items():
                self.modules[n].weight.data = w

    def many(self, plans) -> list[torch.Tensor]:
        """`self(plan)` for each plan, in order (what `measured_search` calls; Ray fans the same calls out)."""
        return [self(p) for p in plans]

    def __enter__(self) -> "PlanScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.cache.clear()

    def __call__(self, plan) -> torch.Tensor:
        """ΔNLL of `plan` on each calibration sequence (nats/token; their mean is the plan's measured loss)."""
        from layerscope.compress.quant_stats import quantize_weight

        weights = {}
        for name, scheme in plan.assignment().items():
            key = (name, scheme)
            if key not in self.cache:
                self.cache[key] = quantize_weight(self.modules[name].weight.data, scheme, self.hessians.get(name),
                                                  self.act_order)[0]
            weights[name] = self.cache[key]
        return self._nll(weights) - self.base


@torch.no_grad()
def planned_weights(lm, parts, plan, state: dict, *, sequential: bool = False, log=lambda m: None):
    """({name: dequantized weight}, {name: QuantizedWeight} for GPTQ layers) of `plan`; the model is left as it was."""
    from layerscope.compress.quant_stats import apply_gptq

    modules = dict(parts.model.named_modules())
    original = {e.name: modules[e.name].weight.data for e in plan.entries}
    if plan.method == "gptq":
        gptq_inputs(lm, parts, state, sequential)
    losses = state.get("losses")
    hessians = losses.hessians if losses is not None and not sequential else None
    try:
        qweights = apply_gptq(parts, plan.assignment(), hessians=hessians, batches=state.get("batches"),
                              damp=state["damp"], act_order=state["act_order"], sequential=sequential, log=log)
        weights = {n: modules[n].weight.data for n in original}
    finally:
        for n, w in original.items():
            modules[n].weight.data = w
    return weights, qweights


@torch.no_grad()
def gptq_inputs(lm, parts, state: dict, sequential: bool) -> None:
    """Make sure `state` holds what GPTQ reads: the calibration batches, and (not sequential) every
    linear's Hessian from one statistics pass -- kept in `state` for the next plan."""
    losses = state.get("losses")
    if state.get("batches") is None and (sequential or losses is None or losses.hessians is None):
        state["batches"] = calibration_batches(lm.tokenizer, state["tokens"], state["seq_len"])
    if sequential or (losses is not None and losses.hessians is not None):
        return
    hessians: dict[str, torch.Tensor] = {}

    def keep(i, _b, stats):
        for lin, st in stats.items():
            hessians[f"{parts.blocks_path}.{i}.{lin}"] = st.hessian(state["damp"])

    from layerscope.compress.quant_stats import CandidateLosses
    from layerscope.engine.moments import linear_moments

    linear_moments(parts, state["batches"], on_block=keep, sequential=False)
    state["losses"] = losses or CandidateLosses(options=list(state["options"]))
    state["losses"].hessians = hessians


@torch.no_grad()
def perplexity_with(model, ids, protocol, weights: dict | None) -> float:
    from layerscope.evaluation.perplexity import perplexity

    modules = dict(model.named_modules())
    original = {n: modules[n].weight.data for n in (weights or {})}
    try:
        for n, w in (weights or {}).items():
            modules[n].weight.data = w
        return perplexity(model, ids=ids, protocol=protocol).perplexity
    finally:
        for n, w in original.items():
            modules[n].weight.data = w


def evaluate_against_uniform(lm, parts, plan, state, *, eval_tokens: int, sequential: bool, say,
                             ray: str | None = None) -> dict:
    """Held-out perplexity of the unquantized model, the plan and the uniform plan at the same budget;
    predicted vs measured change of mean NLL; which plan ships. `ray`: the three evaluations as Ray tasks."""
    from layerscope.evaluation.perplexity import PerplexityProtocol, token_stream

    proto = PerplexityProtocol(max_tokens=eval_tokens)
    ids = token_stream(lm.tokenizer, proto)
    say(f"evaluating held-out perplexity ({proto.describe()})" + (" as Ray tasks" if ray else ""))
    candidates = [("plan", plan)]
    if plan.strategy == "milp" and state.get("uniform") is not None:
        candidates.append(("uniform", state["uniform"]))
    if plan.method == "gptq":
        gptq_inputs(lm, parts, state, sequential)  # once, before the plans share it
    todo = [None] + [p for _, p in candidates]
    if ray:
        from layerscope.actions.quantize_parallel import evaluate_plans_ray

        done = evaluate_plans_ray(parts.model, ids, proto, state, sequential, todo, ray)
    else:
        done = [evaluate_plan(parts, ids, proto, state, sequential, p, say) for p in todo]
    base = done[0][0]
    rows = [{"name": "unquantized", "bpw": 32.0, "perplexity": base}]
    best, best_ppl, weights_of = None, math.inf, {}
    for (tag, p), (ppl, w, qw) in zip(candidates, done[1:]):
        measured = math.log(ppl) - math.log(base)
        rows.append({"name": f"{tag} ({p.by})", "bpw": p.achieved_bpw, "perplexity": ppl,
                     "predicted_dnll": p.objective, "measured_dnll": measured})
        pred = f"predicted ΔNLL {p.objective:.4g}, " if p.objective is not None else ""
        say(f"{tag} {p.by}: {p.achieved_bpw:.4f} bpw, perplexity {ppl:.4f} ({ppl / base - 1:+.2%}); "
            f"{pred}measured ΔNLL {measured:.4g} nats/token")
        weights_of[tag] = (w, qw)
        if ppl < best_ppl:
            best, best_ppl = tag, ppl
    shipped = plan
    if best == "uniform":
        shipped = state["uniform"]
        note = (f"the exact plan measured worse than the uniform plan at the same budget "
                f"({rows[1]['perplexity']:.4f} vs {rows[2]['perplexity']:.4f}): shipping the uniform plan")
        say(note)
        shipped.notes.append(note)
        shipped.provenance = dict(plan.provenance, shipped="uniform (measured better than the exact plan)")
    else:
        shipped.provenance["shipped"] = "exact plan" if len(candidates) > 1 else "plan"
    shipped.provenance["evaluation"] = {"protocol": proto.model_dump(), "unquantized_perplexity": base,
                                        "rows": rows[1:], "path": "dequantized weights, fp32 compute"}
    return {"rows": rows, "plan": shipped, "weights": weights_of["uniform" if best == "uniform" else "plan"],
            "ids": ids}


def evaluate_plan(parts, ids, protocol, state: dict, sequential: bool, plan, log=lambda m: None):
    """(held-out perplexity, dequantized weights, QuantizedWeights) of `plan` (None: the unquantized
    model, no weights). `state` must already hold GPTQ's inputs (`gptq_inputs`)."""
    if plan is None:
        return perplexity_with(parts.model, ids, protocol, None), None, None
    w, qw = planned_weights(None, parts, plan, state, sequential=sequential, log=log)
    return perplexity_with(parts.model, ids, protocol, w), w, qw
