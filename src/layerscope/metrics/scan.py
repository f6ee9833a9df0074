"""`layerscope.scan`: every requested metric for every block, sublayer and head in one block-sequential pass."""
from __future__ import annotations

import datetime as _dt
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from layerscope import __version__
from layerscope.data.windows import prepare_tokens
from layerscope.engine.runner import BlockRunner, make_batches
from layerscope.errors import LayerscopeError
from layerscope.metrics import (
    DEFAULT_METRICS,
    METRICS,
    BlockObservation,
    Metric,
    ScanContext,
)
from layerscope.metrics.table import Provenance, ScoreColumn, ScoreTable
from layerscope.model.adapter import ModelParts, find_parts
from layerscope.model.offload import block_resident, from_disk, streamer_of, unstream


# Metrics that back-propagate through (or read) every block at once: not computed out-of-core.
NEEDS_ALL_WEIGHTS = ("taylor", "fisher", "grad_norm", "weight_norm", "relevance")


def resolve_metrics(names: Iterable[str] | str | None) -> list[str]:
    """Metric names as the user typed them (comma lists allowed; 'default' and 'all' expand)."""
    if names is None:
        return list(DEFAULT_METRICS)
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for item in names:
        for n in (x.strip() for x in str(item).split(",")):
            if not n:
                continue
            expanded = list(DEFAULT_METRICS) if n == "default" else list(METRICS) if n == "all" else [n]
            for e in expanded:
                if e not in METRICS:
                    raise LayerscopeError(f"unknown metric '{e}' (known: {', '.join(sorted(METRICS))})")
                if e not in out:
                    out.append(e)
    if not out:
        raise LayerscopeError("no metrics requested")
    return out


class _Observer:
    """Forward hooks on one block that collect what a BlockObservation needs."""

    def __init__(self, parts: ModelParts, i: int, needs: set[str]):
        self.store: dict[str, torch.Tensor] = {}
        self.collect_probs = False
        self.handles = []
        mid = parts.mid[i]
        if mid is not None:
            where, mod = mid
            if where == "input":
                self.handles.append(mod.register_forward_pre_hook(self._grab_input("h_mid")))
            else:
                self.handles.append(mod.register_forward_hook(self._grab_output("h_mid")))
        self.handles.append(parts.attention[i].register_forward_hook(self._attention_hook(parts.num_heads)))
        oproj = parts.attn_out_proj[i]
        if "head_out" in needs and oproj is not None and parts.num_heads:
            self.handles.append(oproj.register_forward_pre_hook(self._heads_hook(parts.num_heads)))
        down = parts.mlp_down_proj[i]
        if "mlp_act" in needs and down is not None:
            self.handles.append(down.register_forward_pre_hook(self._grab_input("mlp_act")))

    def _grab_input(self, key: str):
        def hook(module, args):
            self.store[key] = args[0].detach()

        return hook

    def _grab_output(self, key: str):
        def hook(module, args, output):
            self.store[key] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def _attention_hook(self, num_heads: int | None):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.store["attn_out"] = out.detach()
            if self.collect_probs and isinstance(output, tuple):
                for t in output[1:]:
                    if isinstance(t, torch.Tensor) and t.dim() == 4 and (num_heads is None or t.shape[1] == num_heads):
                        self.store["attn_probs"] = t.detach()
                        break

        return hook

    def _heads_hook(self, num_heads: int):
        def hook(module, args):
            x = args[0].detach()
            if self.collect_probs and x.shape[-1] % num_heads == 0:
                self.store["head_out"] = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator[Any]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True) as prog:
        task = prog.add_task(label, total=total)
        yield lambda: prog.advance(task)


def max_positions(model: nn.Module) -> int | None:
    """The model's longest supported sequence, from its config (None if it does not say)."""
    cfg = getattr(model, "config", None)
    for k in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def scan(
    model: str | nn.Module | None = None,
    data: Any = None,
    metrics: Sequence[str] | str | None = None,
    *,
    tokenizer: Any = None,
    tokens: int = 8192,
    seq_len: int = 512,
    batch_size: int = 4,
    attn_seqs: int = 2,
    lens_tokens: int | None = None,
    seed: int = 0,
    split: str = "calibration",
    trust_remote_code: bool = False,
    progress: bool = False,
    options: dict[str, Any] | None = None,
    device: str | None = None,
    dtype: Any = None,
    offload: bool | None = None,
) -> ScoreTable:
    """Score every block, attention/MLP sublayer and head of `model` in one block-sequential pass.

    model: local directory, hub id, 'smollm2'/'gemma3'/'minilm', None (the embedded default) or a loaded
    transformers model (then pass `tokenizer` for text data). offload: stream each block from the
    safetensors shards when it runs (True), never (False), or when the weights do not fit in memory (None). data: 'wikipedia' (default),
    'shakespeare', a .txt/.jsonl/.csv path, a list of strings, or an int tensor [N, T] of token ids.
    """
    t0 = time.perf_counter()
    names = resolve_metrics(metrics)
    model_id, weights_sha, source_tokenizer, load_warnings = "in-memory", None, tokenizer, []
    if model is None or isinstance(model, (str,)) or hasattr(model, "__fspath__"):
        from layerscope.model.loading import load_model

        loaded = load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype, offload=offload)
        model, model_id, weights_sha = loaded.model, loaded.model_id, loaded.weights_sha256
        source_tokenizer = tokenizer or loaded.tokenizer
        load_warnings = loaded.warnings
    else:
        model_id = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    model.eval()
    parts = find_parts(model)
    L = parts.num_layers

    instances: list[Metric] = []
    skipped: dict[str, str] = {}
    streamed = from_disk(model)
    moved = unstream(model) if any(n in NEEDS_ALL_WEIGHTS for n in names) else None  # GPU path, in RAM
    if moved:
        parts.notes.append(moved)
    for n in names:
        cls = METRICS[n]
        why = cls.unavailable(parts) if hasattr(cls, "unavailable") else None
        if streamed and n in NEEDS_ALL_WEIGHTS:
            why = "needs every block's weights at once (gradients): not available out-of-core (--no-offload)"
        if why:
            skipped[n] = why
        else:
            instances.append(cls())
    needs_data = any(m.needs_data for m in instances)

    opts = dict(options or {})
    if weights_sha:  # for in-memory models a caller may pass options={"weights_sha256": ...} itself
        opts["weights_sha256"] = weights_sha
    max_pos = max_positions(model)
    if max_pos:
        seq_len = min(seq_len, max_pos)
    ids, source = (None, None)
    batches: list[dict[str, torch.Tensor]] = []
    eager = 0
    n_tokens = 0
    if needs_data:
        want_eager = attn_seqs if any("attn_probs" in m.needs for m in instances) else 0
        if isinstance(data, dict):  # non-text inputs, e.g. {"pixel_values": tensor}
            first = next(iter(data.values()))
            source, n_tokens = f"{', '.join(data)} {tuple(first.shape)}", int(first.shape[0])
            batches, eager = make_batches(data, batch_size, want_eager)
        else:
            ids, source = prepare_tokens(source_tokenizer, data, tokens, seq_len, split)
            batches, eager = make_batches(ids, batch_size, want_eager)
            n_tokens = int(ids.numel())
    if lens_tokens is None:  # ~1/32 of the positions: the lens then costs about one output-head pass
        lens_tokens = min(max(64, n_tokens // 32), 1024)
    opts["lens_tokens"] = lens_tokens
    runner = BlockRunner(parts, batches, eager_batches=eager) if needs_data else None
    ctx = ScanContext(parts=parts, runner=runner, num_layers=L, num_heads=parts.num_heads,
                      n_tokens=n_tokens, seed=seed, options=opts)
    torch.manual_seed(seed)
    for m in instances:
        m.begin(ctx)
    needs: set[str] = set().union(*(m.needs for m in instances)) if instances else set()
    data_metrics = [m for m in instances if m.needs_data]

    with torch.no_grad(), _progress(progress, L, f"scan {model_id}") as advance:
        hidden: list[torch.Tensor] = []
        carried: dict[int, BlockObservation] = {}  # batch -> last observation (its output is the next input)
        if runner is not None:
            runner.capture()
            hidden = [b.first_hidden for b in runner.batches]
            for b, h in enumerate(hidden):
                runner.check_finite(h, "the embedding output")
        for i in range(L):
            with block_resident(model, i):  # out-of-core: block i's weights are read from the shards now
                for m in instances:
                    m.observe_weights(i)
            if runner is not None:
                hidden = _run_block(runner, parts, i, hidden, needs, data_metrics, carried)
            for m in instances:
                m.block_done(i)
            advance()
        columns = [c for m in instances for c in m.finish()]
        del hidden

    prov = Provenance(
        model_id=str(model_id),
        model_family=parts.family,
        weights_sha256=weights_sha,
        num_layers=L,
        num_heads=parts.num_heads,
        calibration_source=source,
        calibration_tokens=n_tokens,
        seq_len=int(ids.shape[1]) if ids is not None else None,
        seed=seed,
        layerscope_version=__version__,
        torch_version=torch.__version__,
        transformers_version=_transformers_version(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        wall_time_s=round(time.perf_counter() - t0, 3),
        options={"metrics": names, "tokens": tokens, "seq_len": seq_len, "batch_size": batch_size,
                 "attn_seqs": attn_seqs if eager else 0, "lens_tokens": lens_tokens, "split": split},
        notes=[*load_warnings, *parts.notes],
        skipped=skipped,
    )
    streamer = streamer_of(model)
    if streamer is not None:
        streamer.release()
        prov.notes.append(f"weights streamed block by block: {streamer.note} ({streamer.loads} block loads)")
    if eager:
        prov.notes.append(f"per-head attention statistics use the first {attn_seqs} sequences with eager attention")
    table = ScoreTable(provenance=prov)
    for c in columns:
        table.add(ScoreColumn(name=c.name, metric=c.metric, unit=c.unit, direction=c.direction,
                              definition=c.definition, reference=c.reference, values=c.values, details=c.details))
    return table


def _run_block(runner: BlockRunner, parts: ModelParts, i: int, hidden: list[torch.Tensor], needs: set[str],
               metrics: list[Metric], carried: dict[int, BlockObservation]) -> list[torch.Tensor]:
    observer = _Observer(parts, i, needs)
    out_hidden = []
    try:
        for b, (batch, h) in enumerate(zip(runner.batches, hidden)):
            observer.store.clear()
            observer.collect_probs = batch.eager
            out = runner.forward_block(i, h, batch)
            runner.check_finite(out, f"the output of block {i}")
            s = {k: _as_tokens(v, h) for k, v in observer.store.items()}
            obs = BlockObservation(index=i, batch_index=b, h_in=h, h_out=out, h_mid=s.get("h_mid"),
                                   attn_out=s.get("attn_out"), attn_probs=observer.store.get("attn_probs"),
                                   head_out=s.get("head_out"), mlp_act=s.get("mlp_act"))
            obs.inherit(carried.get(b))
            for m in metrics:
                m.observe(obs)
            carried[b] = obs
            out_hidden.append(out)
            hidden[b] = None  # type: ignore[call-overload]  # free the input as soon as possible
    finally:
        observer.remove()
    return out_hidden


def _as_tokens(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Some blocks (OPT) flatten [B, T, d] to [B*T, d] inside; restore the token layout."""
    if x.dim() == 2 and x.shape[0] == like.shape[0] * like.shape[1]:
        return x.reshape(like.shape[0], like.shape[1], x.shape[-1])
    return x


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
