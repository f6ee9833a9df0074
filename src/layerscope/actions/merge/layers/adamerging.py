"""AdaMerging (Yang et al. 2024, Adaptive Model Merging for Multi-Task Learning), layer-wise.

Learns one coefficient per task, block and sublayer (and one for the embeddings and one for the head)
by minimising the merged model's prediction entropy on unlabelled inputs of every task, with Adam from
λ_t (the reference starts at 0.3). The merged model is evaluated functionally
(`torch.func.functional_call`) with θ = θ₀ + Σ_t c_t ⊙ τ̂_t, where τ̂_t is the task vector after the
merge method's trimming / dropping and the sign election at the starting coefficients (held fixed while
learning; the final merge recomputes them with the learned coefficients). Entropy is averaged over every
position (``entropy: all``) or taken at each input's last token (``entropy: last``, for prompts whose
answer is the next token). Stops early when the entropy on held-out inputs has not improved for
`patience` steps and keeps the best coefficients.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from layerscope.actions.merge.groups import LAYER_GROUPS, constant_coefficients


def _entropy(logits: torch.Tensor, mask: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    if last is not None:
        logits = logits[torch.arange(len(last)), last][:, None]
        mask = torch.ones(len(last), 1)
    logp = F.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return (ent * mask).sum() / mask.sum().clamp_min(1)


def masked_deltas(ctx, lams: list[float]) -> list[dict[str, torch.Tensor]]:
    """τ̂_t: what the merge method keeps of each task vector at the starting coefficients."""
    from layerscope.actions.merge.methods.dare_ties import drop
    from layerscope.actions.merge.methods.ties import elect, trim

    method = ctx.plan.method
    if method == "task_arithmetic":
        return ctx.deltas
    out: list[dict[str, torch.Tensor]] = [{} for _ in ctx.deltas]
    for name in ctx.base:
        if method == "ties":
            ds = [trim(d[name], ctx.plan.density) for d in ctx.deltas]
        else:
            gen = ctx.generator(name)
            ds = [drop(d[name], ctx.plan.density, gen) for d in ctx.deltas]
        w = torch.stack(ds) * torch.tensor(lams).view(-1, *([1] * ds[0].dim()))
        keep = elect(w)
        for t, d in enumerate(ds):
            out[t][name] = d * keep[t]
    return out


def coefficients(ctx) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from torch.func import functional_call

    plan, L, T = ctx.plan, ctx.num_layers, len(ctx.deltas)
    lams = ctx.lambdas()
    init = [plan.init if plan.init is not None else lam for lam in lams]
    deltas = masked_deltas(ctx, lams)
    layer = torch.tensor([[list(init)] * L] * len(LAYER_GROUPS)).permute(2, 0, 1).contiguous()  # [T, G, L]
    layer.requires_grad_(True)
    scalars = torch.tensor([[v, v] for v in init], requires_grad=True)  # [T, 2]: embed, head
    opt = torch.optim.Adam([layer, scalars], lr=plan.lr)
    train, held = ctx.entropy_batches()
    model = ctx.model
    model.eval()
    names = list(ctx.base)

    def params() -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            info = ctx.infos[name]
            p = ctx.base[name]
            for t in range(T):
                c = (layer[t, LAYER_GROUPS.index(info.group), info.layer] if info.layer is not None
                     else scalars[t, 0 if info.group == "embed" else 1])
                p = p + c * deltas[t][name]
            out[name] = p
        return out

    def loss_on(batches) -> torch.Tensor:
        ps = params()
        total = 0.0
        for b in batches:
            logits = functional_call(model, ps, args=(), kwargs=dict(input_ids=b["input_ids"],
                                     attention_mask=b["attention_mask"], use_cache=False)).logits
            total = total + _entropy(logits, b["attention_mask"].float(), b.get("last"))
        return total / len(batches)

    def snapshot() -> list[dict[str, Any]]:
        out = []
        for t in range(T):
            c = constant_coefficients(0.0, L)
            for gi, g in enumerate(LAYER_GROUPS):
                c[g] = [float(v) for v in layer[t, gi].detach()]
            c["embed"], c["head"] = float(scalars[t, 0].detach()), float(scalars[t, 1].detach())
            out.append(c)
        return out

    with torch.no_grad():
        best = float(loss_on(held))
    best_coefs, history, since = snapshot(), [{"step": 0, "heldout_entropy": best}], 0
    bar = ctx.progress(plan.steps, "AdaMerging")
    stopped = "steps"
    for step in range(1, plan.steps + 1):
        opt.zero_grad()
        loss = loss_on(train)
        loss.backward()
        opt.step()
        with torch.no_grad():
            h = float(loss_on(held))
        history.append({"step": step, "train_entropy": float(loss), "heldout_entropy": h})
        bar(step, f"entropy {float(loss):.3f} held-out {h:.3f}")
        if not math.isfinite(h):
            stopped = "non-finite entropy"
            break
        if h < best - 1e-4:
            best, best_coefs, since = h, snapshot(), 0
        else:
            since += 1
            if since >= plan.patience:
                stopped = f"early stop: no held-out improvement for {plan.patience} steps"
                break
    return best_coefs, {"init": init, "lr": plan.lr, "steps_run": len(history) - 1, "stopped": stopped,
                        "best_heldout_entropy": best, "history": history,
                        "note": "trim/drop masks and sign election fixed at the starting coefficients while "
                                "learning; the final merge recomputes them with the learned ones"}
