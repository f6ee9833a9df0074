"""`layerscope probe`: layer-wise linear probes (concept depth) and, with --cka, the layer similarity map."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import Device, Dtype, Force, Quiet, RayAddress, Seed, TrustRemoteCode
from layerscope.errors import LayerscopeError


def write_outputs(out: Path, json_name: str, result, title: str, model_dir: Path | None, verb: str,
                  force: bool = False) -> dict[str, Path]:
    """Write <json_name> and report.html into `out` (the output policy of `outputs`)."""
    from layerscope.outputs import output_dir

    page = result.report_html(title)
    with output_dir(out, verb=verb, force=force, sources=(model_dir,)) as tmp:
        result.to_json(tmp / json_name)
        (tmp / "report.html").write_text(page, encoding="utf-8")
    return {"json": out / json_name, "html": out / "report.html"}


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe_cmd(
        model: Optional[str] = typer.Argument(None, help="Local model directory, hub id, or 'smollm2'/'minilm'. Default: embedded SmolLM2-135M-Instruct."),
        data: Optional[Path] = typer.Option(None, "--data", help="Labelled data: .csv/.tsv (columns) or .jsonl/.json (objects)."),
        text_field: str = typer.Option("text", "--text-field", help="Column/field holding the text."),
        label_field: str = typer.Option("label", "--label-field", help="Column/field holding the label."),
        concept: Optional[list[str]] = typer.Option(None, "--concept", "-c", help="Built-in concept(s) when no --data: sentiment, source (default: both)."),
        n: int = typer.Option(2000, "--n", help="Examples (deterministic class-balanced subsample)."),
        pooling: Optional[list[str]] = typer.Option(None, "--pooling", help="mean and/or last (default: both)."),
        depth_fraction: float = typer.Option(0.9, "--depth-fraction", help="Concept depth: first layer reaching this fraction of the best accuracy above baseline."),
        control: bool = typer.Option(True, "--control/--no-control", help="Also fit shuffled-label control probes."),
        cka: bool = typer.Option(False, "--cka", help="Add the layer x layer linear-CKA similarity map (Wikipedia calibration tokens)."),
        cka_only: bool = typer.Option(False, "--cka-only", help="Only the CKA map, no probes."),
        cka_tokens: int = typer.Option(2048, "--cka-tokens", help="Tokens for CKA."),
        cka_outlier_ratio: float = typer.Option(5.0, "--cka-outlier-ratio", help="Leave tokens whose norm exceeds this multiple of the layer median out of the main CKA matrix (0: keep all)."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Token limit per text (default min(context, 512))."),
        on_long: str = typer.Option("truncate", "--on-long", help="Texts over --max-length: truncate (with a warning) or error."),
        batch_size: int = typer.Option(32, "--batch-size"),
        precision: str = typer.Option("auto", "--precision", help="Forward precision for features: auto (bfloat16 autocast where the CPU/GPU has native bf16), float32, bfloat16."),
        seed: Seed = 0,
        out: Path = typer.Option(Path("layerscope-probe"), "--out", "-o", help="Output directory (probe.json, report.html)."),
        force: Force = False,
        device: Device = "cpu",
        dtype: Dtype = None,
        trust_remote_code: TrustRemoteCode = False,
        ray: RayAddress = None,
        quiet: Quiet = False,
    ) -> None:
        """Linear probes at every layer: accuracy with 95% CIs, shuffled-label control, concept depth."""
        import warnings

        from layerscope.analysis.probes import probe
        from layerscope.analysis.similarity import layer_similarity
        from layerscope.model.subject import load_subject

        if on_long not in ("truncate", "error"):
            raise LayerscopeError("--on-long must be 'truncate' or 'error'")
        if n < 1 or batch_size < 1 or cka_tokens < 2 or (max_length is not None and max_length < 2):
            raise LayerscopeError("--n, --batch-size, --cka-tokens and --max-length must be positive")
        if ray and cka_only:
            raise LayerscopeError("--ray fans out the probe fits, and --cka-only fits none: leave one of them out")
        if ray:  # the layer fits run as Ray tasks
            from layerscope.engine.ray_pool import require_ray

            require_ray()
        subject = load_subject(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        from layerscope.outputs import check_output

        check_output(out, force=force, sources=(subject.model_dir,))  # before the work, not after it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if quiet else "default")
            if cka_only:
                from layerscope.analysis.probes import ProbeResult
                from layerscope.model.subject import layer_names

                sim = layer_similarity(subject, tokens=cka_tokens, seed=seed, outlier_ratio=cka_outlier_ratio or None)
                result = ProbeResult(model_id=subject.model_id, model_family=subject.parts.family,
                                     weights_sha256=subject.weights_sha256, num_layers=subject.num_layers,
                                     layer_names=layer_names(subject.num_layers), concepts={}, similarity=sim)
            else:
                result = probe(subject, data, concepts=concept if data is None else (concept or None),
                               text_field=text_field, label_field=label_field, n=n,
                               poolings=tuple(pooling or ("mean", "last")), depth_fraction=depth_fraction,
                               control=control, batch_size=batch_size, max_length=max_length, on_long=on_long,
                               precision=precision,
                               cka=cka, cka_tokens=cka_tokens, cka_outlier_ratio=cka_outlier_ratio or None, seed=seed,
                               progress=not quiet, ray=ray)
        paths = write_outputs(out, "probe.json", result, f"layerscope probe: {subject.model_id}", subject.model_dir,
                              verb="probe", force=force)
        if not quiet:
            typer.echo(result.summary())
        typer.echo(f"wrote {paths['json']}, {paths['html']}")
