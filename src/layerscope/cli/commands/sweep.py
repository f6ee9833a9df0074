"""`layerscope sweep`: perplexity against the number of removed units for several orderings."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import Device, Dtype, Force, Offload, Quiet, RayAddress, TrustRemoteCode
from layerscope.errors import LayerscopeError


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep_cmd(
        model: Optional[str] = typer.Argument(None, help="Local model directory, hub id, or 'smollm2'. Default: embedded SmolLM2-135M-Instruct."),
        unit: str = typer.Option("block", "--unit", help="block, attention or mlp."),
        remove: str = typer.Option("0..4", "--remove", help="Numbers of removed units: K or A..B."),
        orders: str = typer.Option("default", "--orders", help="Comma list: METRIC, reverse[:METRIC], random:N, greedy; 'default' = every ranking metric + reverse + random:5 + greedy."),
        scores: Optional[Path] = typer.Option(None, "--scores", help="scores.json from `layerscope scan` (else a scan runs now)."),
        dataset: str = typer.Option("wikipedia", "--dataset", help="Evaluation text: 'wikipedia', 'shakespeare' or a file."),
        split: str = typer.Option("evaluation", "--split", help="Split of a built-in corpus."),
        tokens: int = typer.Option(16384, "--tokens", help="Evaluated tokens."),
        context: int = typer.Option(512, "--context", help="Context length of each perplexity window."),
        stride: Optional[int] = typer.Option(None, "--stride", help="Window stride (default: the context length)."),
        batch_size: int = typer.Option(4, "--batch-size"),
        greedy_tokens: int = typer.Option(2048, "--greedy-tokens", help="Calibration tokens for the greedy reference order."),
        greedy_data: str = typer.Option("wikipedia", "--greedy-data", help="Text for the greedy order (its calibration split)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random orders."),
        out: Path = typer.Option(Path("layerscope-sweep"), "--out", "-o", help="Output directory."),
        force: Force = False,
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep from the checkpoint in "
                                    "--out (same numbers as an uninterrupted run)."),
        device: Device = "cpu",
        dtype: Dtype = None,
        offload: Offload = None,
        ray: RayAddress = None,
        trust_remote_code: TrustRemoteCode = False,
        quiet: Quiet = False,
    ) -> None:
        """Perplexity vs number of removed units for metric, reverse, random and greedy orders (JSON + chart)."""
        from layerscope.engine.removal import check_unit
        from layerscope.evaluation import sweep as sw
        from layerscope.evaluation.perplexity import PerplexityProtocol
        from layerscope.metrics.table import ScoreTable
        from layerscope.model.loading import (
            config_layers,
            load_model,
            resolve,
            source_dtype,
        )
        from layerscope.outputs import check_output
        from layerscope.plans.prune import metric_for_column as source_metric

        check_unit(unit)
        if ray:  # the sweep's points run as Ray tasks
            from layerscope.engine.ray_pool import require_ray

            require_ray()
        specs = sw.parse_orders(orders)
        protocol = PerplexityProtocol(dataset=dataset, split=split, context_length=context,
                                      stride=stride or context, max_tokens=tokens, batch_size=batch_size)
        if protocol.stride > protocol.context_length or protocol.stride < 1 or tokens < 2 or batch_size < 1:
            raise LayerscopeError("--stride must be between 1 and --context; --tokens and --batch-size must be positive")
        _, source_dir = resolve(model)
        check_output(out, force=force, sources=(source_dir,))
        n_cfg = config_layers(source_dir)
        if n_cfg is not None:
            sw.parse_range(remove, n_cfg, unit)
        table = ScoreTable.from_json(scores) if scores is not None else None
        for s in specs:
            if s.kind == "metric" and table is not None:
                table.column(s.arg, unit)
            elif s.kind == "metric" and source_metric(s.arg) is None:
                from layerscope.metrics import METRICS

                raise LayerscopeError(f"unknown metric '{s.arg}' (known: {', '.join(sorted(METRICS))}; or pass --scores)")
        loaded = load_model(model, trust_remote_code=trust_remote_code, dtype=dtype or source_dtype(source_dir),
                            device=device, offload=offload)
        from layerscope.engine.removal import num_units

        ks = sw.parse_range(remove, num_units(loaded.model, unit), unit)
        if table is not None:
            table.check_same_model(loaded.weights_sha256, num_units(loaded.model, unit), where=scores)
        log = (lambda s: None) if quiet else (lambda s: typer.echo(s, err=True))
        from layerscope.checkpoint import Checkpoint, checkpoint_name
        from layerscope.outputs import claim_output

        checkpoint = Checkpoint(out / checkpoint_name("sweep"), claim=lambda: claim_output(
            out, [checkpoint_name("sweep")], verb="sweep", force=force, sources=(source_dir,)), fingerprint={
            "verb": "sweep", "model": str(model), "weights": loaded.weights_sha256, "unit": unit, "remove": remove,
            "orders": orders, "scores": _table_digest(table), "dataset": dataset,
            "split": split, "tokens": tokens, "context": context, "stride": stride, "batch_size": batch_size,
            "greedy_tokens": greedy_tokens, "greedy_data": greedy_data, "seed": seed, "dtype": str(dtype)},
            resume=resume)
        needs_table = any(s.kind in ("metric", "default", "metrics", "reverse") for s in specs)
        if table is None and needs_table and "table" in checkpoint:
            table = ScoreTable.model_validate(checkpoint.get("table"))
        elif table is None and needs_table:
            from layerscope.metrics.scan import scan

            names = sorted({source_metric(s.arg) for s in specs if s.kind == "metric"})
            metrics = None if any(s.kind in ("default", "metrics") for s in specs) or not names else names
            log(f"scanning {loaded.model_id} ({'default metrics' if metrics is None else ', '.join(metrics)}) ...")
            table = scan(loaded.model, None, metrics, tokenizer=loaded.tokenizer)
            checkpoint.put("table", table.to_dict())
        res = sw.run_sweep(loaded.model, loaded.tokenizer, unit=unit, ks=ks, orders=specs, table=table,
                           protocol=protocol, greedy_tokens=greedy_tokens, greedy_data=greedy_data, seed=seed,
                           model_id=loaded.model_id, weights_sha256=loaded.weights_sha256, log=log,
                           checkpoint=checkpoint, ray=ray)
        written = write_sweep_outputs(res, table, out, force, sources=(source_dir,))
        checkpoint.remove()
        typer.echo(f"wrote {', '.join(str(p) for p in written)}")


def _table_digest(table) -> str | None:
    """sha256 of a score table's columns (the orders a sweep follows come from them)."""
    if table is None:
        return None
    import hashlib
    import json

    cols = {n: [c.values, c.direction] for n, c in sorted(table.columns.items())}
    return hashlib.sha256(json.dumps(cols, sort_keys=True, default=str).encode()).hexdigest()


def write_sweep_outputs(res: dict, table, out: Path, force: bool, sources: tuple = ()) -> list[Path]:
    """sweep.json, sweep.png and, with a score table, scores.json (extras['sweep']) and report.html."""
    from layerscope.evaluation import sweep as sw
    from layerscope.outputs import output_dir

    names = ["sweep.json", "sweep.png"]
    with output_dir(out, verb="sweep", force=force, sources=sources) as tmp:
        sw.RemovalSweep(res).to_json(tmp / "sweep.json")
        sw.save_png(res, tmp / "sweep.png")
        if table is not None:
            table.extras[sw.SWEEP_KEY] = res
            table.to_json(tmp / "scores.json")
            names.append("scores.json")
            from layerscope.report import render_report

            (tmp / "report.html").write_text(render_report(table), encoding="utf-8")
            names.append("report.html")
    return [out / n for n in names]
