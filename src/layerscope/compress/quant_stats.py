"""Measured per-linear quantization loss for every candidate scheme, from the actual quantizer.

For a linear layer with output y = Wx, quantizing W to Ŵ = W + E changes y by δ_t = E x_t at token
t. To second order the change of the calibration loss (summed next-token NLL) is ½ Σ_t (g_tᵀ δ_t)²
with g_t = ∂loss/∂y_t (Fisher / Gauss-Newton approximation of the Hessian, as in HAWQ-v2, Dong et
al. 2020, and the output-Fisher sensitivity of BRECQ, Li et al. 2021). Rounding errors of different
output channels are independent, so only the channel diagonal is kept: ½ Σ_t Σ_j g_tj² δ_tj².
Two loss models approximate G_tj = g_tj² so that the sum needs only per-layer statistics:

* ``token_fisher`` (default): G_tj ≈ a_t·b_j with a_t = Σ_j G_tj (the token's gradient energy) and
  b_j = Σ_t G_tj / Σ_tj G_tj, exact when G has rank one, so that
  ΔNLL per token ≈ ½ Σ_j b_j (E M_a Eᵀ)_jj / n, M_a = Σ_t a_t x_t x_tᵀ.
  Tokens whose output the loss barely depends on do not count: checked on SmolLM2, XᵀX is dominated
  by the attention-sink tokens with massive activations, and the diagonal model below predicted 0.76
  nats/token for uniform 4-bit RTN where 0.20 was measured (this model: 0.33).
* ``fisher``: g and x independent, ½ Σ_j F_j (E XᵀX/n Eᵀ)_jj, F_j = mean_t G_tj.

F, b and a come from one forward+backward pass over the calibration text (`output_gradients`,
block by block with the engine's runner); XᵀX and M_a from the one statistics pass
(`engine.moments.linear_moments`, token weights a_t). For every (linear, candidate) the candidate's
own quantizer produces E (HQQ round-to-nearest, HQQ's optimiser, or GPTQ with this layer's
Hessian), so nothing is extrapolated between bit widths or group sizes.

The estimates are per layer; the allocator adds them. Whether quantization errors of many layers
add up is measured, not assumed: the same pass runs the first `joint_tokens` calibration tokens
through the model with *every* linear at one option (`UniformTracks`, one track per option) and
compares the measured ΔNLL with the sum of that option's per-layer estimates. On SmolLM2 the
errors of uniform 3-bit compound (2.08 measured vs 1.49 predicted) while uniform 4-bit ones
partly cancel (0.20 vs 0.33); each option's estimates are multiplied by its measured ÷ predicted
ratio (`joint_factors`, recorded in the plan), so the allocator does not buy a few 8-bit layers
with many 3-bit ones on the strength of an additive estimate. `actions.quantize` prints the
plan's predicted total next to the measured held-out change.

Checkpoint: the gradient statistics, each block's measured losses and the joint measurement are
written as they are measured (`checkpoint/` in --out); `resume` reloads them and measures only the
blocks still missing.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from layerscope.compress.gptq import QuantizedWeight, gptq_quantize, output_error
from layerscope.compress.quant import Scheme, fake_quant
from layerscope.errors import LayerscopeError

FISHER_FILE = "fisher.safetensors"
LOSS_FILE = "candidate_losses.json"


def effective_scheme(scheme: Scheme, shape) -> Scheme:
    """The scheme a layer really gets: GPTQ groups run along a row, so the group must divide the input
    width; a larger one falls back to the largest group (halving) that does. Other methods: unchanged."""
    if scheme.method != "gptq" or not scheme.quantized:
        return scheme
    g = scheme.group_size
    while g >= 8 and int(shape[1]) % g:
        g //= 2
    if g < 8:
        raise LayerscopeError(f"gptq: no group size ≤ {scheme.group_size} divides the input width {int(shape[1])}")
    return Scheme(scheme.bits, g, scheme.method)


def quantize_weight(W: torch.Tensor, scheme: Scheme, hessian: torch.Tensor | None, act_order: bool = False,
                    ) -> tuple[torch.Tensor, QuantizedWeight | None]:
    """(dequantized weight in W's dtype, the GPTQ codes when the method is gptq)."""
    if scheme.method == "gptq" and scheme.quantized:
        if hessian is None:
            raise LayerscopeError("gptq needs the layer's Hessian (calibration statistics)")
        s = effective_scheme(scheme, W.shape)
        qw = gptq_quantize(W, hessian, s.bits, s.group_size, act_order=act_order)
        return qw.weight.to(W.dtype), qw
    if scheme.method == "gptq":  # 16 bits: float16 like every method
        scheme = Scheme(scheme.bits, scheme.group_size, "rtn")
    return fake_quant(W, scheme), None


# --------------------------------------------------------------------------- gradient pass
@dataclass
class OutputGradients:
    """What one forward+backward pass over the calibration text tells about each block linear's output y."""

    fisher: dict[str, torch.Tensor]  # full linear name -> F [out] float32: mean over tokens of (∂loss/∂y_j)²
    tokens: int
    energy: dict[str, list[torch.Tensor]] | None = None  # name -> per batch [tokens] float32: ‖∂loss/∂y_t‖²


@torch.no_grad()
def output_gradients(parts, batches: Sequence[dict[str, torch.Tensor]], *, per_token: bool = False,
                     log: Callable[[str], None] = lambda m: None) -> OutputGradients:
    """One gradient pass of the summed next-token NLL, block by block with the engine's runner: the
    per-channel mean squared output gradient of every block linear and, with `per_token`, each
    token's squared gradient norm (the token weights of the "token_fisher" loss model)."""
    from layerscope.engine.runner import BlockRunner

    runner = BlockRunner(parts, list(batches))
    runner.capture()
    mods = {f"{parts.blocks_path}.{i}.{n}": m for i in range(parts.num_layers)
            for n, m in parts.block_linears(i).items()}
    acc = {n: None for n in mods}
    energy: dict[str, list[torch.Tensor]] | None = {n: [] for n in mods} if per_token else None

    def fwd_hook(name):
        def hook(_m, _args, out):
            if out.requires_grad:
                def grad_hook(g):
                    g2 = g.detach().float().reshape(-1, g.shape[-1]) ** 2
                    s = g2.sum(0).double()
                    acc[name] = s if acc[name] is None else acc[name] + s
                    if energy is not None:
                        energy[name].append(g2.sum(1))
                out.register_hook(grad_hook)
        return hook

    flags = {p: p.requires_grad for p in parts.model.parameters()}
    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in mods.items()]
    tokens = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        for b, batch in enumerate(runner.batches):
            ids = batch.inputs["input_ids"].to(runner.device)
            with torch.enable_grad():
                h = batch.first_hidden.detach().requires_grad_(True)
                for i in range(parts.num_layers):
                    h = runner.forward_block(i, h, batch)
                logits = runner.head_logits(h)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="sum")
                loss.backward()
            tokens += int(ids.numel())
            log(f"  gradient pass: batch {b + 1}/{len(runner.batches)}")
    finally:
        for hd in handles:
            hd.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    missing = [n for n, v in acc.items() if v is None]
    if missing:
        raise LayerscopeError(f"no gradient reached {missing[0]} (and {len(missing) - 1} more layers)")
    return OutputGradients({n: (v / tokens).float() for n, v in acc.items()}, tokens, energy)


def output_fisher(parts, batches: Sequence[dict[str, torch.Tensor]], log: Callable[[str], None] = lambda m: None,
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """({full linear name: F [out] float32}, tokens): mean over tokens of the squared gradient of the
    summed next-token NLL with respect to each block linear's output."""
    g = output_gradients(parts, batches, log=log)
    return g.fisher, g.tokens


# --------------------------------------------------------------------------- candidate losses
LOSS_MODELS = ("token_fisher", "fisher")
JOINT_FLOOR = 0.002  # nats/token: below this a uniform plan's measured and predicted losses are noise
FACTOR_RANGE = (0.1, 10.0)


@dataclass
class CandidateLosses:
    """Loss estimate (nats/token) per linear layer and candidate scheme, as the allocator uses it
    (`losses`: the per-layer estimates times the option's joint factor), with what it came from."""

    options: list[Scheme]
    losses: dict[str, list[float]] = field(default_factory=dict)  # full name -> per option
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> damped H (kept for gptq)
    tokens: int = 0
    resumed_blocks: list[int] = field(default_factory=list)
    loss_model: str = "token_fisher"
    raw: dict[str, list[float]] = field(default_factory=dict)  # per-layer estimates before the joint factors
    joint: list[dict] = field(default_factory=list)  # per option: measured / predicted ΔNLL of the uniform plan

    def subset(self, options: Sequence[Scheme]) -> "CandidateLosses":
        """The same measurement restricted to `options` (e.g. one quantization method of several)."""
        idx = [self.options.index(o) for o in options]
        pick = lambda rows: {n: [r[k] for k in idx] for n, r in rows.items()}  # noqa: E731
        return CandidateLosses(options=list(options), losses=pick(self.losses), hessians=self.hessians,
                               tokens=self.tokens, resumed_blocks=self.resumed_blocks, loss_model=self.loss_model,
                               raw=pick(self.raw), joint=[self.joint[k] for k in idx] if self.joint else [])


def joint_factors(options: Sequence[Scheme], raw: dict[str, list[float]], measured: list[float | None]) -> list[dict]:
    """Per option: the measured ΔNLL of quantizing every linear with it, the sum of the per-layer
    predictions, and the factor the allocator multiplies that option's losses by (measured ÷
    predicted; 1 with the reason when either is below JOINT_FLOOR or was not measured)."""
    out = []
    for k, o in enumerate(options):
        pred = float(sum(r[k] for r in raw.values()))
        m = measured[k] if k < len(measured) else None
        row = {"option": o.to_dict(), "predicted": pred, "measured": m, "factor": 1.0, "reason": None}
        if not o.quantized:
            row["reason"] = "unquantized"
        elif m is None:
            row["reason"] = "not measured"
        elif m < JOINT_FLOOR or pred < JOINT_FLOOR:
            row["reason"] = f"below the {JOINT_FLOOR} nats/token noise floor"
        else:
            row["factor"] = min(max(m / pred, FACTOR_RANGE[0]), FACTOR_RANGE[1])
        out.append(row)
    return out


def leading_batches(batches, tokens: int) -> list:
    """The first batches holding at least `tokens` tokens (all of them when there are fewer): the
    calibration prefix on which plans are measured jointly."""
    out, n = [], 0
    for b in batches:
        if n >= tokens:
            break
        out.append(b)
        n += int(b["input_ids"].numel())
    return out


class UniformTracks:
    """The calibration prefix run through the model with every linear at one option (one track per
    option) next to the unquantized model, advanced block by block inside the statistics pass: the
    measured joint loss of each uniform plan, which checks the per-layer estimates' additivity."""

    def __init__(self, parts, batches, options: Sequence[Scheme]):
        from layerscope.engine.runner import BlockRunner

        self.parts, self.options = parts, list(options)
        self.runner = BlockRunner(parts, list(batches))
        self.runner.capture()
        first = [b.first_hidden for b in self.runner.batches]
        self.dense = list(first)
        self.tracks = {k: list(first) for k, o in enumerate(self.options) if o.quantized}

    @torch.no_grad()
    def advance(self, i: int, k: int | None, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Run block i on track k (None: the unquantized track) with `weights` {linear: weight} swapped in."""
        mods = self.parts.block_linears(i)
        saved = {n: mods[n].weight.data for n in (weights or {})}
        try:
            for n, w in (weights or {}).items():
                mods[n].weight.data = w
            hs = self.dense if k is None else self.tracks[k]
            hs[:] = [self.runner.forward_block(i, h, b) for h, b in zip(hs, self.runner.batches)]
        finally:
            for n, w in saved.items():
                mods[n].weight.data = w

    @torch.no_grad()
    def _nll(self, hs: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for h, b in zip(hs, self.runner.batches):
            ids = b.inputs["input_ids"].to(h.device)
            logits = self.runner.head_logits(h)
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                           ids[:, 1:].reshape(-1), reduction="sum"))
            count += int(ids[:, 1:].numel())
        return total / count

    def measured(self) -> list[float | None]:
        base = self._nll(self.dense)
        return [self._nll(self.tracks[k]) - base if k in self.tracks else None for k in range(len(self.options))]


class Checkpoint:
    """checkpoint/ in the output folder: the request's key, the gradient statistics, measured blocks,
    the joint (uniform-plan) measurement once it is complete."""

    def __init__(self, directory: Path | None, key: dict):
        self.dir, self.key = directory, key
        self.blocks: dict[str, dict[str, list[float]]] = {}
        self.joint: list[float | None] | None = None
        self.gradient_tokens = 0

    def load(self, batches=None) -> OutputGradients | None:
        if self.dir is None or not (self.dir / LOSS_FILE).is_file():
            raise LayerscopeError(f"--resume: no checkpoint in {self.dir} (expected {LOSS_FILE})")
        data = json.loads((self.dir / LOSS_FILE).read_text(encoding="utf-8"))
        if data.get("key") != self.key:
            diff = sorted(k for k in set(data.get("key", {})) | set(self.key)
                          if data.get("key", {}).get(k) != self.key.get(k))
            raise LayerscopeError(f"--resume: the checkpoint was made for another request (differs in {', '.join(diff)})")
        self.blocks = data.get("blocks", {})
        self.joint = data.get("joint")
        self.gradient_tokens = int(data.get("gradient_tokens", 0))
        if not (self.dir / FISHER_FILE).is_file():
            return None
        from safetensors.torch import load_file

        flat = load_file(str(self.dir / FISHER_FILE))
        fisher = {k[len("fisher/"):]: v for k, v in flat.items() if k.startswith("fisher/")}
        energy = None
        if any(k.startswith("energy/") for k in flat):
            sizes = [int(b["input_ids"].numel()) for b in batches or []]
            energy = {n: list(torch.split(flat[f"energy/{n}"], sizes)) for n in fisher}
        return OutputGradients(fisher, self.gradient_tokens, energy)

    def save_gradients(self, grads: OutputGradients) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_file

        flat = {f"fisher/{k}": v.contiguous() for k, v in grads.fisher.items()}
        for k, parts in (grads.energy or {}).items():
            flat[f"energy/{k}"] = torch.cat(parts).contiguous()
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (FISHER_FILE + ".tmp")
        save_file(flat, str(tmp))
        tmp.replace(self.dir / FISHER_FILE)
        self.gradient_tokens = grads.tokens
        self._write()

    def save_block(self, block: int, losses: dict[str, list[float]]) -> None:
        self.blocks[str(block)] = losses
        self._write()

    def save_joint(self, measured: list[float | None]) -> None:
        self.joint = measured
        self._write()

    def _write(self) -> None:
        if self.dir is None:
            return
        from layerscope.outputs import write_json_atomic

        write_json_atomic(self.dir / LOSS_FILE, {"key": self.key, "blocks": self.blocks, "joint": self.joint,
                                                 "gradient_tokens": self.gradient_tokens})


def measure_candidates(parts, batches, options: Sequence[Scheme], *, damp: float = 0.01, act_order: bool = False,
                       keep_hessians: bool = True, checkpoint: Checkpoint | None = None, resume: bool = False,
                       loss_model: str = "token_fisher", joint_tokens: int = 4096,
                       log: Callable[[str], None] = lambda m: None,
                       after_block: Callable[[int], None] | None = None,
                       only_blocks: Callable[[int], bool] | None = None) -> CandidateLosses:
    """One gradient pass and one statistics pass: every (linear, option) loss estimate; with
    `joint_tokens` > 0 the same pass also measures each option's uniform plan on that many
    calibration tokens and scales the option's estimates by measured ÷ predicted (`joint_factors`)."""
    from layerscope.engine.moments import linear_moments

    if loss_model not in LOSS_MODELS:
        raise LayerscopeError(f"unknown quantization loss model '{loss_model}' (known: {', '.join(LOSS_MODELS)})")
    ck = checkpoint or Checkpoint(None, {})
    grads = ck.load(batches) if resume else None
    if grads is not None and loss_model == "token_fisher" and grads.energy is None:
        grads = None  # a checkpoint of the diagonal model: the token weights are still needed
    if grads is None:
        log("gradient pass (output gradients of every linear layer)")
        grads = output_gradients(parts, batches, per_token=loss_model == "token_fisher", log=log)
        ck.save_gradients(grads)
    fisher = grads.fisher
    res = CandidateLosses(options=list(options), loss_model=loss_model)
    res.resumed_blocks = sorted(int(b) for b in ck.blocks)
    gptq = any(o.method == "gptq" and o.quantized for o in options)  # only GPTQ reads the Hessians
    need_h = keep_hessians and gptq
    tracks = None
    if joint_tokens > 0 and ck.joint is None and only_blocks is None:
        tracks = UniformTracks(parts, leading_batches(batches, joint_tokens), options)

    def on_block(i: int, _block, stats) -> None:
        done = ck.blocks.get(str(i))
        if only_blocks is not None and not only_blocks(i) and done is None:
            return  # measured by another process (parallel measurement over block ranges)
        per: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        hs = {}
        for lin, st in stats.items():
            name = f"{parts.blocks_path}.{i}.{lin}"
            hs[lin] = st.hessian(damp) if gptq else None
            if need_h:
                res.hessians[name] = hs[lin]
            res.tokens = st.tokens
        for k, o in enumerate(options):  # option by option: one block's worth of quantized weights alive
            if done is not None and (tracks is None or k not in tracks.tracks):
                continue
            qs = {lin: quantize_weight(st.module.weight.data, o, hs[lin], act_order)[0] for lin, st in stats.items()}
            if done is None:
                for lin, st in stats.items():
                    per.setdefault(f"{parts.blocks_path}.{i}.{lin}", []).append(
                        _loss(qs[lin], st, fisher[f"{parts.blocks_path}.{i}.{lin}"], loss_model))
            if tracks is not None and k in tracks.tracks:
                tracks.advance(i, k, qs)
        if tracks is not None:
            tracks.advance(i, None)
        if done is None:
            ck.save_block(i, per)
            log(f"  block {i}: measured {len(per)} layers x {len(options)} candidates ({time.perf_counter() - t0:.0f} s)")
        res.raw.update(done if done is not None else per)
        if after_block is not None:
            after_block(i)

    linear_moments(parts, batches, on_block=on_block, sequential=False,
                   token_weights=grads.energy if loss_model == "token_fisher" else None)
    res.tokens = res.tokens or grads.tokens
    if tracks is not None:
        ck.save_joint(tracks.measured())
    if joint_tokens > 0 and ck.joint is not None and len(res.raw) == len(fisher):
        res.joint = joint_factors(options, res.raw, ck.joint)
        log("uniform plans, measured vs predicted ΔNLL (nats/token): " + "; ".join(
            f"{Scheme(**j['option']).label} {j['measured'] if j['measured'] is not None else float('nan'):.4g}"
            f"/{j['predicted']:.4g}" for j in res.joint if j["reason"] != "unquantized"))
    factors = [j["factor"] for j in res.joint] if res.joint else [1.0] * len(options)
    res.losses = {n: [v * f for v, f in zip(row, factors)] for n, row in res.raw.items()}
    return res


def _loss(Wq: torch.Tensor, st, fisher: torch.Tensor, loss_model: str) -> float:
    """Predicted ΔNLL (nats/token) of replacing the layer's weight with Wq (module docstring)."""
    E = Wq.double() - st.module.weight.data.double()
    if loss_model == "fisher":
        return 0.5 * output_error(E, st.xtx / st.tokens, fisher)
    total = float(fisher.double().sum())
    if total <= 0:
        return 0.0  # no gradient reaches this layer's output: the loss does not depend on it
    return 0.5 * output_error(E, st.wxtx / st.tokens, fisher.double() / total)


@torch.no_grad()
def apply_gptq(parts, assignment: dict[str, Scheme], *, hessians: dict[str, torch.Tensor] | None = None,
               batches=None, damp: float = 0.01, act_order: bool = False, sequential: bool = False,
               log: Callable[[str], None] = lambda m: None) -> dict[str, QuantizedWeight]:
    """Quantize the planned layers in place (GPTQ for gptq schemes). With `sequential` the Hessians
    are collected again block by block from the already-quantized prefix; else `hessians` are used."""
    modules = dict(parts.model.named_modules())
    out: dict[str, QuantizedWeight] = {}

    def one(name: str, H: torch.Tensor | None) -> None:
        m = modules[name]
        Wq, qw = quantize_weight(m.weight.data, assignment[name], H, act_order)
        m.weight.data = Wq
        if qw is not None:
            out[name] = qw

    if sequential:
        from layerscope.engine.moments import linear_moments

        def on_block(i, _block, stats):
            for lin, st in stats.items():
                name = f"{parts.blocks_path}.{i}.{lin}"
                if name in assignment:
                    one(name, st.hessian(damp))
            log(f"  block {i} quantized")

        linear_moments(parts, batches, on_block=on_block, sequential=True)
        return out
    for name in assignment:
        one(name, (hessians or {}).get(name))
    return out
