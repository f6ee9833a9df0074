"""Neuron decoding: what each MLP neuron writes, read off in vocabulary space.

Neuron j of block l writes ``a_j * w_j`` into the residual stream, where ``w_j`` is column j of
the MLP's down projection ([d_model, d_ff]).  Projecting that direction through the final norm's
gain ``g`` and the output head ``W_U`` gives the logit change per unit activation,
``W_U (g * w_j)`` (Geva et al. 2022, "Transformer Feed-Forward Layers Build Predictions by
Promoting Concepts in the Vocabulary Space"; Dar et al. 2023).  The norm's normalisation by the
RMS of the *whole* residual stream and its bias are not direction-specific and are left out;
Gemma-style norms that scale by ``1 + weight`` are handled.

Scores are centred logits: the projection minus its mean over the vocabulary, because a direction
that raises every logit equally promotes nothing.  Ranking a neuron's top tokens is unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from layerscope.errors import LayerscopeError


def final_gain(parts) -> torch.Tensor | None:
    """The final norm's elementwise gain (None when the model has no final norm or no weight)."""
    norm = parts.final_norm
    w = getattr(norm, "weight", None) if norm is not None else None
    if w is None:
        return None
    w = w.detach().float()
    if "gemma" in type(norm).__name__.lower():
        w = 1.0 + w
    return w


def neuron_directions(parts, block: int) -> torch.Tensor:
    """[d_ff, d_model]: row j is what neuron j of `block` writes into the residual stream."""
    from layerscope.model.adapter import linear_weight

    down = parts.mlp_down_proj[block]
    if down is None:
        raise LayerscopeError(f"block {block} has no MLP down projection to decode")
    return linear_weight(down).detach().float().T.contiguous()


def _unembed(parts) -> torch.Tensor:
    if parts.head is None or not parts.causal:
        raise LayerscopeError("neuron decoding needs a causal language model with an output head "
                              "(encoders such as MiniLM/BERT have none)")
    w = parts.head.weight.detach().float()  # [V, d]
    if parts.head_proj is not None:  # OPT-350m: head(project_out(x)) = (W_head W_proj) x
        from layerscope.model.adapter import linear_weight

        w = w @ linear_weight(parts.head_proj).detach().float()
    return w


@torch.no_grad()
def neuron_logits(parts, block: int) -> torch.Tensor:
    """[d_ff, V] centred logit change per unit activation of each neuron of `block`."""
    W = _unembed(parts)
    dirs = neuron_directions(parts, block)
    g = final_gain(parts)
    if g is not None:
        dirs = dirs * g
    logits = dirs @ W.T
    return logits - logits.mean(-1, keepdim=True)


def _token_str(tokenizer, i: int) -> str:
    if tokenizer is None:
        return f"<{i}>"
    try:
        return tokenizer.decode([int(i)])
    except (TypeError, ValueError, KeyError, IndexError, OverflowError):  # ids outside the tokenizer's table
        return f"<{i}>"


@dataclass
class NeuronResult:
    top_k: int
    layers: dict[int, list[dict]] = field(default_factory=dict)  # block -> [{neuron, tokens, logits, bottom...}]
    promote: dict[str, dict] = field(default_factory=dict)  # token -> {"token_id", "neurons": [...]}
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"definition": "centred logit change per unit activation: W_U (g * w_j) minus its vocabulary mean; "
                              "w_j = column j of the MLP down projection, g = final-norm gain",
                "convention": "layers here are block indices (neuron j of block l)",
                "top_k": self.top_k, "layers": {str(k): v for k, v in self.layers.items()},
                "promote": self.promote, "notes": self.notes}


def parse_layers(spec: Sequence[int] | str | int | None, num_layers: int) -> list[int]:
    """Block indices from '3,7,10', '0-5', 'all', an int or a list (validated)."""
    if spec is None:
        return []
    if isinstance(spec, int) and not isinstance(spec, bool):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(range(num_layers))
        items = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                try:
                    items.extend(range(int(a), int(b) + 1))
                except ValueError:
                    raise LayerscopeError(f"bad layer range '{part}' (use e.g. 3-7)") from None
            else:
                try:
                    items.append(int(part))
                except ValueError:
                    raise LayerscopeError(f"bad layer '{part}' (use integers, ranges like 3-7, or 'all')") from None
    else:
        items = list(spec)
    out = []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int):
            raise LayerscopeError(f"layer must be an integer, got {x!r}")
        if not 0 <= x < num_layers:
            raise LayerscopeError(f"block {x} is out of range: the model has blocks 0..{num_layers - 1}")
        if x not in out:
            out.append(x)
    return out


@torch.no_grad()
def decode_neurons(model: Any, layers: Sequence[int] | str | int, *, top_k: int = 10,
                   neurons: Sequence[int] | None = None, tokenizer: Any = None) -> dict[int, list[dict]]:
    """Top-k promoted (and demoted) tokens of every neuron (or the given ones) in each block of `layers`."""
    from layerscope.model.subject import Subject, load_subject

    subject = model if isinstance(model, Subject) else load_subject(model, tokenizer, need_tokenizer=False)
    parts = subject.parts
    tok = tokenizer or subject.tokenizer
    _unembed(parts)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise LayerscopeError(f"top_k must be a positive integer, got {top_k!r}")
    out: dict[int, list[dict]] = {}
    for block in parse_layers(layers, parts.num_layers):
        logits = neuron_logits(parts, block)
        idx = list(range(logits.shape[0])) if neurons is None else list(neurons)
        for j in idx:
            if not 0 <= j < logits.shape[0]:
                raise LayerscopeError(f"neuron {j} is out of range: block {block} has {logits.shape[0]} neurons")
        sub = logits[idx]
        k = min(top_k, sub.shape[1])
        top = sub.topk(k, dim=-1)
        bot = (-sub).topk(k, dim=-1)
        spread = sub.std(-1)
        rows = []
        for r, j in enumerate(idx):
            rows.append({
                "neuron": j,
                "top_token_ids": top.indices[r].tolist(),
                "top_tokens": [_token_str(tok, t) for t in top.indices[r].tolist()],
                "top_logits": [round(float(v), 5) for v in top.values[r]],
                "bottom_tokens": [_token_str(tok, t) for t in bot.indices[r].tolist()],
                "bottom_logits": [round(-float(v), 5) for v in bot.values[r]],
                "top_z": round(float(top.values[r, 0] / spread[r]), 3) if spread[r] > 0 else None,
            })
        out[block] = rows
    return out


def resolve_token(tokenizer: Any, token: str | int) -> int:
    """A single vocabulary id for `token` (an id, or a string that must encode to exactly one token)."""
    if isinstance(token, int) and not isinstance(token, bool):
        return token
    if tokenizer is None:
        raise LayerscopeError("a tokenizer is needed to look up tokens by text")
    s = str(token)
    if s.startswith("#") and s[1:].isdigit():
        return int(s[1:])
    ids = tokenizer(s, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        alt = tokenizer(" " + s, add_special_tokens=False)["input_ids"] if not s.startswith(" ") else []
        hint = f" (' {s}' is one token: id {alt[0]})" if len(alt) == 1 else ""
        raise LayerscopeError(f"'{s}' is {len(ids)} tokens {ids}, not one; give a single token or '#<id>'{hint}")
    return int(ids[0])


@torch.no_grad()
def promoting_neurons(model: Any, token: str | int, *, top_k: int = 20, layers: Sequence[int] | str | None = None,
                      tokenizer: Any = None) -> dict:
    """The (block, neuron) pairs whose output direction most raises `token`'s centred logit."""
    from layerscope.model.subject import Subject, load_subject

    subject = model if isinstance(model, Subject) else load_subject(model, tokenizer, need_tokenizer=False)
    parts = subject.parts
    tok = tokenizer or subject.tokenizer
    W = _unembed(parts)
    tid = resolve_token(tok, token)
    if not 0 <= tid < W.shape[0]:
        raise LayerscopeError(f"token id {tid} is out of range (vocabulary size {W.shape[0]})")
    g = final_gain(parts)
    u = W[tid] - W.mean(0)  # centred: logit of tid minus the mean logit
    if g is not None:
        u = u * g
    blocks = parse_layers(layers, parts.num_layers) if layers is not None else list(range(parts.num_layers))
    scores, where = [], []
    for b in blocks:
        s = neuron_directions(parts, b) @ u  # [d_ff]
        scores.append(s)
        where.extend((b, j) for j in range(s.shape[0]))
    allv = torch.cat(scores)
    k = min(top_k, allv.shape[0])
    top = allv.topk(k)
    return {"token": _token_str(tok, tid), "token_id": tid,
            "per_layer_max": {str(b): round(float(v.max()), 5) for b, v in zip(blocks, scores)},
            "neurons": [{"layer": where[i][0], "neuron": where[i][1], "score": round(float(v), 5)}
                        for v, i in zip(top.values.tolist(), top.indices.tolist())]}


def neuron_report(subject, layers: Sequence[int] | str | None = None, promote: Sequence[str] | str | None = None,
                  top_k: int = 10, show: int = 24) -> NeuronResult:
    """Decode the neurons of `layers` and search for the neurons promoting each `promote` token."""
    res = NeuronResult(top_k=top_k)
    if layers is not None:
        res.layers = decode_neurons(subject, layers, top_k=top_k)
    if promote:
        for t in ([promote] if isinstance(promote, str) else list(promote)):
            res.promote[str(t)] = promoting_neurons(subject, t, top_k=max(top_k, 20))
    return res


