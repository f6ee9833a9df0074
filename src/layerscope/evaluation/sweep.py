"""Removal curves: perplexity against the number of removed units, for several orderings.

An ordering lists units from first to last removed. The curve at K is the perplexity of the model
without the first K units of the ordering, under one explicit `PerplexityProtocol`. Orderings:

* ``METRIC``    -- a ScoreTable column's ranking (least important first, one shot);
* ``reverse``   -- the reverse of the best metric's ranking (lowest mean perplexity over the sweep;
                  ``reverse:METRIC`` names it); a sanity check that the metric's order matters;
* ``random:N``  -- N random permutations (seeded), drawn as a band: median and min/max per K;
* ``greedy``    -- the reference: the ground-truth ablation order stored in the ScoreTable when
                  present, else computed here: remove the unit whose removal raises the loss on
                  held-out calibration text least, then repeat on the pruned model.

Removal is done in memory (`actions.prune.removed`: blocks dropped with renumbered layer_idx and
a subset config, exactly the model a written directory loads; sublayers ablated to zero).
"""
from __future__ import annotations

import datetime as _dt
import math
import random as _random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from layerscope.errors import LayerscopeError
from layerscope.results import Result

SWEEP_KEY = "sweep"


@dataclass
class OrderSpec:
    kind: str  # metric | reverse | random | greedy
    arg: str | None = None  # metric name (metric/reverse) or count (random)

    @property
    def label(self) -> str:
        if self.kind == "metric":
            return str(self.arg)
        if self.kind == "reverse":
            return f"reverse:{self.arg}" if self.arg else "reverse"
        if self.kind == "random":
            return f"random:{self.arg}"
        return self.kind


def parse_orders(text: str | Sequence[str] | None) -> list[OrderSpec]:
    """'block_influence,angular_distance_n1,random:5,reverse,greedy' -> specs (None: 'default')."""
    items: list[str] = []
    for t in ([text] if isinstance(text, str) else list(text or ["default"])):
        items += [x.strip() for x in str(t).split(",") if x.strip()]
    out: list[OrderSpec] = []
    for it in items:
        name, _, arg = it.partition(":")
        if name == "random":
            try:
                n = int(arg or "5")
            except ValueError:
                raise LayerscopeError(f"random orders are written random:N (got '{it}')") from None
            if n < 1:
                raise LayerscopeError("random:N needs N >= 1")
            out.append(OrderSpec("random", str(n)))
        elif name == "reverse":
            out.append(OrderSpec("reverse", arg or None))
        elif name in ("greedy", "default", "metrics"):
            out.append(OrderSpec(name))
        else:
            out.append(OrderSpec("metric", it))
    if not out:
        raise LayerscopeError("--orders is empty")
    return out


def parse_range(text: str | int, n_units: int, unit: str) -> list[int]:
    """'0..7' or '7' -> [0, 1, ..., 7] (numbers of removed units); checked against the model."""
    s = str(text).strip()
    try:
        if ".." in s:
            a, b = (int(x) for x in s.split("..", 1))
        else:
            a, b = 0, int(s)
    except ValueError:
        raise LayerscopeError(f"--remove expects K or A..B (got '{s}')") from None
    if a < 0 or b < a:
        raise LayerscopeError(f"--remove range '{s}' is empty or negative")
    if b >= n_units:
        noun = "blocks" if unit == "block" else f"{unit} sublayers"
        raise LayerscopeError(f"cannot remove {b} of {n_units} {noun}: K must be smaller than the number of units")
    return list(range(a, b + 1))


def ranking_columns(table, unit: str) -> list[str]:
    """Every column of `unit` with an importance direction (the orderings a default sweep uses)."""
    return [c.name for c in table.columns.values() if c.unit == unit and c.direction is not None]


def ground_truth_order(table, unit: str) -> tuple[list[int], str] | None:
    """The ablation (greedy/iterative) order stored by the ground-truth module, if any.

    Looked up in the score columns' ``details['greedy']`` (``ablation`` metric with
    ``ablation_greedy=K``), then in ``table.extras``: ``ground_truth.<greedy|iterative|order>[.<unit>]`` being a
    list of unit indices or a dict with ``order`` (also ``ablation_order`` / ``greedy_order`` at the
    top level).
    """
    if table is None:
        return None
    cands: list[tuple[Any, str]] = []
    # layerscope.ground_truth's ablation metric keeps its greedy order in the block column's details
    for col in table.columns.values():
        g = (col.details or {}).get("greedy")
        if col.unit == unit and isinstance(g, dict) and g.get("order"):
            cands.append((g, f"{col.name} details.greedy (by {g.get('by', '?')})"))
    ex = table.extras or {}
    gt = ex.get("ground_truth")
    if isinstance(gt, dict):
        for key in ("greedy", "iterative", "order", "greedy_order", "ablation_order"):
            if key in gt:
                cands.append((gt[key], f"extras.ground_truth.{key}"))
    for key in ("ablation_order", "greedy_order", "greedy"):
        if key in ex:
            cands.append((ex[key], f"extras.{key}"))
    for value, where in cands:
        if isinstance(value, dict) and unit in value:
            value, where = value[unit], f"{where}.{unit}"
        if isinstance(value, dict) and value.get("unit", unit) != unit:
            continue
        if isinstance(value, dict):
            value = value.get("order")
        if isinstance(value, list) and value and all(isinstance(i, int) for i in value):
            return list(value), where
    return None


# ------------------------------------------------------------------------------ greedy

def greedy_order(model: Any, unit: str, ids: Any, k: int, batch_size: int = 4,
                 progress: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """The greedy reference order on token windows `ids`: the shared greedy ablation
    (`metrics.ground_truth.ablation.greedy_removal`) by mean NLL, run block by block."""
    from layerscope.engine.runner import BlockRunner, make_batches
    from layerscope.metrics.ground_truth.ablation import greedy_removal
    from layerscope.model.adapter import find_parts

    parts = find_parts(model)
    L = parts.num_layers
    if not 1 <= k < L:
        raise LayerscopeError(f"greedy order: K must be between 1 and {L - 1}")
    batches, _ = make_batches(ids, batch_size, 0)
    runner = BlockRunner(parts, batches)
    runner.capture()
    g = greedy_removal(runner, k, by="dloss", unit=unit, progress=progress)
    return {"order": g["order"], "selection_nll": [c["nll"] for c in g["curve"]], "baseline_nll": g["base_nll"]}



# ------------------------------------------------------------------------------ sweep

def _random_orders(n_units: int, count: int, seed: int) -> list[list[int]]:
    rng = _random.Random(seed)
    out = []
    for _ in range(count):
        order = list(range(n_units))
        rng.shuffle(order)
        out.append(order)
    return out


def _band(rows: list[list[float]]) -> dict[str, list[float]]:
    import numpy as np

    a = np.array(rows, dtype=float)
    return {"median": [float(v) for v in np.median(a, axis=0)], "min": [float(v) for v in a.min(axis=0)],
            "max": [float(v) for v in a.max(axis=0)]}


class RemovalSweep(Result):
    """A removal sweep (sweep.json, kind layerscope.sweep): the curves of every ordering."""

    kind = "layerscope.sweep"

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        return self.data

    @classmethod
    def summary_of(cls, d: dict[str, Any]) -> str:
        last = len(d["ks"]) - 1
        rows = [(c["label"], c["perplexity"][last]) for c in d.get("curves", [])]
        if d.get("greedy"):
            rows.append(("greedy ablation", d["greedy"]["perplexity"][last]))
        if d.get("random"):
            rows.append((f"random median of {d['random']['n']}", d["random"]["median"][last]))
        lines = [f"{d.get('model_id', '')}: perplexity after removing {d['ks'][last]} {d['unit']}s "
                 f"(baseline {d['baseline']:.3f})"]
        lines += [f"  {label:<36} {y:.3f}" for label, y in sorted(rows, key=lambda r: r[1])]
        return "\n".join(lines)

    @classmethod
    def table_of(cls, d: dict[str, Any]):
        from layerscope.report.extras import extras_table

        prov = {"model_id": d.get("model_id", ""), "model_family": d.get("model_family", ""),
                "weights_sha256": d.get("weights_sha256"), "num_layers": d.get("num_units", 0),
                "created": d.get("created", "")}
        return extras_table({SWEEP_KEY: d}, prov)


def run_sweep(model: Any, tokenizer: Any, *, unit: str = "block", ks: Sequence[int], orders: Sequence[OrderSpec],
              table: Any = None, protocol: Any = None, ids: Any = None, greedy_tokens: int = 2048,
              greedy_data: str = "wikipedia", greedy_split: str = "calibration", seed: int = 0,
              model_id: str = "", weights_sha256: str | None = None,
              log: Callable[[str], None] | None = None, checkpoint: Any = None,
              ray: str | None = None) -> dict[str, Any]:
    """Perplexity after removing the first K units of each ordering, for every K in `ks`.

    With a `checkpoint` (layerscope.checkpoint) every perplexity and the greedy order are saved as
    they finish; a resumed sweep reuses them (the same numbers as an uninterrupted run).
    ray: evaluate the sweep's points as Ray tasks ("local" cluster or an address); same numbers."""
    from layerscope import __version__
    from layerscope.engine.removal import check_unit, removed
    from layerscope.evaluation.perplexity import (
        PerplexityProtocol,
        perplexity,
        token_stream,
    )

    t0 = time.perf_counter()
    check_unit(unit)
    say = log or (lambda s: None)
    from layerscope.model.adapter import find_parts

    n_units = find_parts(model).num_layers
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 0 or ks[-1] >= n_units:
        raise LayerscopeError(f"numbers of removed units must be between 0 and {n_units - 1}")
    kmax = ks[-1]
    if table is not None and table.num_layers != n_units:
        raise LayerscopeError(f"the score table has {table.num_layers} layers but the model has {n_units} {unit} units")
    protocol = protocol or PerplexityProtocol()
    if ids is None:
        ids = token_stream(tokenizer, protocol)
    cache: dict[tuple[int, ...], float] = {}
    if checkpoint is not None:
        checkpoint.require_same("inputs", {"weights": weights_sha256, "unit": unit, "protocol": protocol.model_dump(),
                                           "tokens_in_stream": int(ids.numel()), "seed": seed})
        done = checkpoint.get("perplexity") or {}
        cache.update({tuple(int(i) for i in k.split(",") if i): float(v) for k, v in done.items()})

    def ppl(removed_units: Sequence[int]) -> float:
        key = tuple(sorted(removed_units))
        if key not in cache:
            with removed(model, unit, key):
                cache[key] = perplexity(model, ids=ids, protocol=protocol).perplexity
            if checkpoint is not None:
                checkpoint.put("perplexity", {",".join(map(str, k)): v for k, v in cache.items()})
        return cache[key]

    pool = None
    if ray:
        from layerscope.engine.ray_pool import WorkerPool

        pool = WorkerPool((model, ids, protocol, unit), ray)

    def prefetch(orders_: Sequence[Sequence[int]], extra: Sequence[tuple[int, ...]] = ()) -> None:
        """With Ray: evaluate every point of these orders that is not cached yet, in parallel."""
        keys = {tuple(sorted(o[:k])) for o in orders_ for k in ks if len(o) >= kmax} | set(extra)
        todo = sorted(keys - set(cache))
        if pool is not None and todo:
            cache.update(zip(todo, pool.map(_ppl_point, todo)))
            if checkpoint is not None:
                checkpoint.put("perplexity", {",".join(map(str, k)): v for k, v in cache.items()})

    def curve(order: Sequence[int]) -> list[float]:
        if len(order) < kmax:
            raise LayerscopeError(f"an ordering ranks only {len(order)} units; the sweep removes up to {kmax}")
        return [ppl(order[:k]) for k in ks]

    expanded: list[OrderSpec] = []
    for o in orders:
        if o.kind in ("default", "metrics"):
            if table is None:
                raise LayerscopeError("metric orders need a score table (pass --scores or let the sweep scan)")
            expanded += [OrderSpec("metric", c) for c in ranking_columns(table, unit)]
            if o.kind == "default":
                expanded += [OrderSpec("reverse"), OrderSpec("random", "5"), OrderSpec("greedy")]
        else:
            expanded.append(o)
    if not any(o.kind == "greedy" for o in expanded):
        expanded.append(OrderSpec("greedy"))  # the reference curve is always drawn
    seen: set[str] = set()
    expanded = [o for o in expanded if not (o.label in seen or seen.add(o.label))]

    result: dict[str, Any] = {
        "model_id": model_id, "weights_sha256": weights_sha256, "unit": unit, "num_units": n_units, "ks": ks,
        "protocol": protocol.model_dump(), "tokens_in_stream": int(ids.numel()),
        "removal": ("in memory: blocks dropped from the ModuleList with renumbered layer_idx and a subset config "
                    "(identical to loading the directory `layerscope prune` writes)" if unit == "block" else
                    "in memory: the sublayer's output replaced by zeros (identical to the zeroed directory)"),
        "curves": [], "random": None, "greedy": None,
        "layerscope_version": __version__, "seed": seed,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if pool is not None:
        prefetch(_planned_orders(expanded, table, unit, n_units, seed), extra=[()])
    say(f"baseline perplexity: {ppl(()):.4f} ({protocol.describe()})")
    result["baseline"] = ppl(())

    metric_curves: dict[str, list[float]] = {}
    for o in expanded:
        if o.kind != "metric":
            continue
        if table is None:
            raise LayerscopeError(f"order '{o.arg}' needs a score table")
        col = table.column(o.arg, unit)
        if col.direction is None:
            raise LayerscopeError(f"metric '{col.name}' is descriptive: it has no importance direction")
        order = table.ranking(col.name)
        ys = curve(order)
        metric_curves[col.name] = ys
        result["curves"].append({"label": col.name, "kind": "metric", "order": order, "perplexity": ys})
        say(f"{col.name}: " + " ".join(f"{y:.3f}" for y in ys))

    for o in expanded:
        if o.kind != "reverse":
            continue
        if o.arg:
            base = table.column(o.arg, unit).name if table is not None else None
            if base is None:
                raise LayerscopeError("reverse:METRIC needs a score table")
        else:
            if not metric_curves:
                raise LayerscopeError("'reverse' is the reverse of the best metric order: list at least one metric")
            base = min(metric_curves, key=lambda c: sum(math.log(y) for y in metric_curves[c]))
        order = list(reversed(table.ranking(base)))
        prefetch([order])
        ys = curve(order)
        result["curves"].append({"label": f"reverse:{base}", "kind": "reverse", "of": base, "order": order,
                                 "perplexity": ys})
        say(f"reverse:{base}: " + " ".join(f"{y:.3f}" for y in ys))

    for o in expanded:
        if o.kind != "random":
            continue
        n = int(o.arg or 5)
        rorders = _random_orders(n_units, n, seed)
        rows = []
        for j, order in enumerate(rorders):
            rows.append(curve(order))
            say(f"random {j + 1}/{n}: " + " ".join(f"{y:.3f}" for y in rows[-1]))
        result["random"] = {"n": n, "seed": seed, "orders": rorders, "perplexity": rows, **_band(rows)}

    if any(o.kind == "greedy" for o in expanded) and kmax > 0:
        gt = ground_truth_order(table, unit)
        if gt is not None and len(gt[0]) >= kmax:
            order, where = gt
            info: dict[str, Any] = {"source": f"ground truth ({where})"}
        else:
            from layerscope.data.sources import load_texts
            from layerscope.data.windows import tokenize_windows

            seq = min(protocol.context_length, 512)
            texts = load_texts(greedy_data, split=greedy_split)
            gids = tokenize_windows(tokenizer, texts, n_tokens=greedy_tokens, seq_len=seq)
            g = checkpoint.get("greedy") if checkpoint is not None else None
            if g is None or g.get("k") != kmax:
                say(f"greedy order on {greedy_data}:{greedy_split}, {gids.numel()} tokens ...")
                g = greedy_order(model, unit, gids, kmax, batch_size=protocol.batch_size,
                                 progress=lambda s, u, l: say(f"  greedy step {s}: remove {u} (nll {l:.4f})"))
                if checkpoint is not None:
                    checkpoint.put("greedy", {**g, "k": kmax})
            order = g["order"]
            info = {"source": "computed (greedy ablation)", "selection_data": f"{greedy_data}:{greedy_split}",
                    "selection_tokens": int(gids.numel()), "selection_seq_len": seq,
                    "selection_nll": g["selection_nll"], "selection_baseline_nll": g["baseline_nll"]}
        prefetch([order])
        ys = curve(order)
        result["greedy"] = {**info, "order": order[:kmax], "perplexity": ys}
        say("greedy: " + " ".join(f"{y:.3f}" for y in ys))
    if pool is not None:
        pool.close()
    result["evaluations"] = len(cache)
    result["wall_time_s"] = round(time.perf_counter() - t0, 2)
    return result


def _ppl_point(payload: tuple, key: tuple[int, ...]) -> float:
    """One sweep point on a Ray worker: perplexity of the model without units `key`."""
    from layerscope.engine.removal import removed
    from layerscope.evaluation.perplexity import perplexity

    model, ids, protocol, unit = payload
    with removed(model, unit, key):
        return perplexity(model, ids=ids, protocol=protocol).perplexity


def _planned_orders(expanded: list[OrderSpec], table: Any, unit: str, n_units: int, seed: int) -> list[list[int]]:
    """The metric and random orders a sweep will evaluate (known before any perplexity)."""
    out: list[list[int]] = []
    for o in expanded:
        if o.kind == "metric" and table is not None:
            col = table.column(o.arg, unit)
            if col.direction is not None:
                out.append(table.ranking(col.name))
        elif o.kind == "random":
            out += _random_orders(n_units, int(o.arg or 5), seed)
    return out


# ------------------------------------------------------------------------------ chart


def save_png(res: dict[str, Any], path: Any) -> None:
    """The same chart as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = res["ks"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    r = res.get("random")
    if r:
        ax.fill_between(ks, r["min"], r["max"], color="0.8", label=f"random ×{r['n']} (min–max)")
        ax.plot(ks, r["median"], color="0.45", ls=":", label="random (median)")
    g = res.get("greedy")
    if g:
        ax.plot(ks, g["perplexity"], color="black", lw=2.5, marker="o", label="greedy ablation (reference)")
    for c in res.get("curves", []):
        ax.plot(ks, c["perplexity"], marker=".", ls="--" if c["kind"] == "reverse" else "-", label=c["label"])
    ax.set_yscale("log")
    ax.set_xticks(ks)
    ax.set_xlabel(f"{res.get('unit', 'block')}s removed")
    ax.set_ylabel("perplexity")
    p = res["protocol"]
    ax.set_title(f"{res.get('model_id', '')}: {p['dataset']}:{p['split']}, {p['max_tokens']} tokens, "
                 f"context {p['context_length']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


