"""`layerscope agree`: how well every cheap metric agrees with ablation / gradient ground truth."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import Device, Dtype, Force, Quiet, Seed, TrustRemoteCode
from layerscope.errors import LayerscopeError


def register(app: typer.Typer) -> None:
    @app.command("agree")
    def agree_cmd(
        model: Optional[str] = typer.Argument(None, help="Local model directory, hub id, or 'smollm2'. Default: embedded SmolLM2-135M-Instruct."),
        scores: Optional[Path] = typer.Option(None, "--scores", help="Start from this scores.json (same model); only what it lacks is computed."),
        truth: Optional[str] = typer.Option(None, "--truth", help="Ground truths, comma-separated (default: ablation_kl,ablation_dloss,taylor,fisher, plus quant_sensitivity when present)."),
        out: Path = typer.Option(Path("layerscope-agree"), "--out", "-o", help="Output directory (agreement.json, scores.json, report.html)."),
        data: str = typer.Option("wikipedia", "--data", help="Calibration text for the cheap metrics and the gradients."),
        second_corpus: str = typer.Option("shakespeare", "--second-corpus", help="Corpus for the corpus-dependence check ('none' to skip)."),
        tokens: int = typer.Option(4096, "--tokens", help="Calibration tokens."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
        batch_size: int = typer.Option(4, "--batch-size"),
        ablation_data: str = typer.Option("evaluation", "--ablation-data", help="'evaluation' (held-out split of Wikipedia) or 'calibration'."),
        ablation_tokens: int = typer.Option(2048, "--ablation-tokens", help="Held-out tokens for the ablation ground truth."),
        gradient_tokens: Optional[int] = typer.Option(None, "--gradient-tokens", help="Cap on the calibration tokens of the gradient / relevance scorers."),
        bootstrap: int = typer.Option(20, "--bootstrap", help="Bootstrap resamples for ranking stability (0 = skip)."),
        groups: int = typer.Option(8, "--groups", help="Groups of calibration windows scanned alone for the bootstrap."),
        no_extras: bool = typer.Option(False, "--no-extras", help="Do not run grad_norm / relevance / weight_norm next to the truths."),
        option: Optional[list[str]] = typer.Option(None, "--option", help="KEY=VALUE passed to the metrics (e.g. ablation_greedy=5, quant_tokens=2048); repeatable."),
        seed: Seed = 0,
        force: Force = False,
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from the checkpoint in --out "
                                    "(same numbers as an uninterrupted run)."),
        device: Device = "cpu",
        dtype: Dtype = None,
        trust_remote_code: TrustRemoteCode = False,
        quiet: Quiet = False,
    ) -> None:
        """Compare every cheap metric with ablation / gradient ground truth and say which to trust."""
        from layerscope.analysis.agreement import agree
        from layerscope.model.loading import resolve
        from layerscope.outputs import check_output
        from layerscope.parsing import key_values

        if tokens < 2 or seq_len < 2 or batch_size < 1 or ablation_tokens < 2 or bootstrap < 0 or groups < 2:
            raise LayerscopeError("--tokens, --seq-len, --ablation-tokens must be >= 2, --groups >= 2, --bootstrap >= 0")
        _, model_dir = resolve(model)
        check_output(out, force=force, sources=(model_dir,))
        from layerscope.checkpoint import Checkpoint, checkpoint_name
        from layerscope.outputs import claim_output

        checkpoint = Checkpoint(out / checkpoint_name("agree"), claim=lambda: claim_output(
            out, [checkpoint_name("agree")], verb="agree", force=force, sources=(model_dir,)), fingerprint={
            "verb": "agree", "model": str(model), "scores": _file_digest(scores), "truth": truth, "data": data,
            "second_corpus": second_corpus, "tokens": tokens, "seq_len": seq_len, "batch_size": batch_size,
            "ablation_data": ablation_data, "ablation_tokens": ablation_tokens, "gradient_tokens": gradient_tokens,
            "bootstrap": bootstrap, "groups": groups, "no_extras": no_extras, "option": option, "seed": seed,
            "dtype": str(dtype)}, resume=resume)
        log = (lambda msg: None) if quiet else (lambda msg: typer.echo(f"agree: {msg}", err=True))
        table = agree(model, scores=scores, truth=truth, out=out, data=data,
                      second_corpus=None if second_corpus.lower() == "none" else second_corpus, tokens=tokens,
                      seq_len=seq_len, batch_size=batch_size, bootstrap=bootstrap, groups=groups,
                      ablation_data=ablation_data, ablation_tokens=ablation_tokens, gradient_tokens=gradient_tokens,
                      extra_scorers=not no_extras, seed=seed, trust_remote_code=trust_remote_code, progress=not quiet,
                      options=key_values(option), log=log, force=force, device=device, dtype=dtype,
                      checkpoint=checkpoint)
        checkpoint.remove()
        if not quiet:
            print_agreement(table.extras["agreement"])
        typer.echo(f"wrote {out / 'agreement.json'}, {out / 'scores.json'}, {out / 'report.html'}")


def _file_digest(path) -> str | None:
    if path is None:
        return None
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return str(path)  # load_result reports the problem itself


def print_agreement(res: dict) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=160)
    primary = res["primary_truth"]
    for unit, cands in res.get("recommendation", {}).items():
        t = Table(title=f"{unit}: agreement with {primary} (best first)")
        for h in ("#", "metric", "kind", "Spearman", "Kendall", "top-5", "bootstrap ρ", "corpus ρ", "verdict"):
            t.add_column(h, no_wrap=h in ("metric", "verdict"))
        for c in cands:
            t.add_row(str(c["rank"]), c["column"], c["kind"], _fmt(c["spearman"]), _fmt(c["kendall"]),
                      _fmt(c["top5_overlap"]), _fmt(c["stability"]), _fmt(c["cross_corpus_spearman"]), c["verdict"])
        console.print(t)
    dis = res.get("disagreements") or {}
    if dis.get("units"):
        console.print(f"blocks where the cheap metrics and {dis['truth']} disagree most (rank 0 = least important):")
        for u in dis["units"]:
            console.print(f"  block {u['unit_index']}: truth rank {u['truth_rank']}, mean cheap rank "
                          f"{u['mean_cheap_rank']:.1f} ({u['reading']})")
    console.print(res.get("answer", ""))


def _fmt(v) -> str:
    return "—" if v is None else f"{v:+.3f}" if isinstance(v, float) else str(v)
