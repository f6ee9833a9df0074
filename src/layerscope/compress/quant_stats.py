"""Measured per-linear quantization loss for every candidate scheme, from the actual quantizer.

For a linear layer with output y = Wx, quantizing W to Ŵ = W + E changes y by δ = Ex. To second
order, the change of the calibration loss (summed next-token NLL) is ½ Σ_t (g_tᵀ δ_t)² with g_t =
∂loss/∂y_t (Fisher / Gauss-Newton approximation of the Hessian, as in HAWQ-v2, Dong et al. 2020,
and the output-Fisher sensitivity of BRECQ, Li et al. 2021). Keeping the per-channel diagonal and
treating g and x as independent,

    ΔNLL per token ≈ ½ Σ_j F_j · (E M Eᵀ)_jj,   F_j = mean_t g_tj²,   M = XᵀX / tokens.

F comes from one forward+backward pass over the calibration text (`output_fisher`, block by block
with the engine's runner); M from the one statistics pass (`engine.moments.linear_moments`). For
every (linear, candidate) the candidate's own quantizer produces E (HQQ round-to-nearest, HQQ's
optimiser, or GPTQ with this layer's Hessian), so nothing is extrapolated between bit widths or
group sizes. The estimate is additive over layers by construction; `actions.quantize` prints it
next to the measured held-out change in mean NLL so the additivity is checked, not assumed.

Checkpoint: the Fisher vectors and each block's measured losses are written as they are measured
(`checkpoint/` in --out); `resume` reloads them and measures only the blocks still missing.
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


# --------------------------------------------------------------------------- Fisher pass
@torch.no_grad()
def output_fisher(parts, batches: Sequence[dict[str, torch.Tensor]], log: Callable[[str], None] = lambda m: None,
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """({full linear name: F [out] float32}, tokens): mean over tokens of the squared gradient of the
    summed next-token NLL with respect to each block linear's output."""
    from layerscope.engine.runner import BlockRunner

    runner = BlockRunner(parts, list(batches))
    runner.capture()
    mods = {f"{parts.blocks_path}.{i}.{n}": m for i in range(parts.num_layers)
            for n, m in parts.block_linears(i).items()}
    acc = {n: None for n in mods}

    def fwd_hook(name):
        def hook(_m, _args, out):
            if out.requires_grad:
                def grad_hook(g):
                    s = (g.detach().float() ** 2).reshape(-1, g.shape[-1]).sum(0).double()
                    acc[name] = s if acc[name] is None else acc[name] + s
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
    return {n: (v / tokens).float() for n, v in acc.items()}, tokens


# --------------------------------------------------------------------------- candidate losses
@dataclass
class CandidateLosses:
    """Measured loss estimate (nats/token) per linear layer and candidate scheme."""

    options: list[Scheme]
    losses: dict[str, list[float]] = field(default_factory=dict)  # full name -> per option
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> damped H (kept for gptq)
    tokens: int = 0
    resumed_blocks: list[int] = field(default_factory=list)


class Checkpoint:
    """checkpoint/ in the output folder: the request's key, the Fisher vectors, measured blocks."""

    def __init__(self, directory: Path | None, key: dict):
        self.dir, self.key = directory, key
        self.blocks: dict[str, dict[str, list[float]]] = {}

    def load(self) -> dict[str, torch.Tensor] | None:
        if self.dir is None or not (self.dir / LOSS_FILE).is_file():
            raise LayerscopeError(f"--resume: no checkpoint in {self.dir} (expected {LOSS_FILE})")
        data = json.loads((self.dir / LOSS_FILE).read_text(encoding="utf-8"))
        if data.get("key") != self.key:
            diff = sorted(k for k in set(data.get("key", {})) | set(self.key)
                          if data.get("key", {}).get(k) != self.key.get(k))
            raise LayerscopeError(f"--resume: the checkpoint was made for another request (differs in {', '.join(diff)})")
        self.blocks = data.get("blocks", {})
        if not (self.dir / FISHER_FILE).is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(self.dir / FISHER_FILE))

    def save_fisher(self, fisher: dict[str, torch.Tensor]) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (FISHER_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp))
        tmp.replace(self.dir / FISHER_FILE)
        self._write()

    def save_block(self, block: int, losses: dict[str, list[float]]) -> None:
        self.blocks[str(block)] = losses
        self._write()

    def _write(self) -> None:
        if self.dir is None:
            return
        from layerscope.outputs import write_json_atomic

        write_json_atomic(self.dir / LOSS_FILE, {"key": self.key, "blocks": self.blocks})


def measure_candidates(parts, batches, options: Sequence[Scheme], *, damp: float = 0.01, act_order: bool = False,
                       keep_hessians: bool = True, checkpoint: Checkpoint | None = None, resume: bool = False,
                       log: Callable[[str], None] = lambda m: None,
                       after_block: Callable[[int], None] | None = None,
                       only_blocks: Callable[[int], bool] | None = None) -> CandidateLosses:
    """One gradient pass and one statistics pass: every (linear, option) loss estimate."""
    from layerscope.engine.moments import linear_moments

    ck = checkpoint or Checkpoint(None, {})
    fisher = ck.load() if resume else None
    tokens = 0
    if fisher is None:
        log("gradient pass (output Fisher of every linear layer)")
        fisher, tokens = output_fisher(parts, batches, log=log)
        ck.save_fisher(fisher)
    res = CandidateLosses(options=list(options))
    res.resumed_blocks = sorted(int(b) for b in ck.blocks)
    need_h = keep_hessians and any(o.method == "gptq" for o in options)

    def on_block(i: int, _block, stats) -> None:
        done = ck.blocks.get(str(i))
        if only_blocks is not None and not only_blocks(i) and done is None:
            return  # measured by another process (parallel measurement over block ranges)
        per: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for lin, st in stats.items():
            name = f"{parts.blocks_path}.{i}.{lin}"
            H = st.hessian(damp) if (need_h or done is None) else None
            if need_h:
                res.hessians[name] = H
            res.tokens = st.tokens
            if done is not None:
                continue
            W = st.module.weight.data
            M = st.xtx / st.tokens
            row = []
            for o in options:
                Wq, _ = quantize_weight(W, o, H, act_order)
                row.append(0.5 * output_error(Wq.double() - W.double(), M, fisher[name]))
            per[name] = row
        if done is None:
            ck.save_block(i, per)
            log(f"  block {i}: measured {len(per)} layers x {len(options)} candidates ({time.perf_counter() - t0:.0f} s)")
        res.losses.update(done if done is not None else per)
        if after_block is not None:
            after_block(i)

    linear_moments(parts, batches, on_block=on_block, sequential=False)
    res.tokens = res.tokens or tokens
    return res


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
