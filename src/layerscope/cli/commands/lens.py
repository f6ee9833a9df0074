"""`layerscope lens`: logit lens beside a trained (resumable) tuned lens; neuron decoding with --neurons/--promote."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import Device, Dtype, Force, Quiet, Seed, TrustRemoteCode
from layerscope.errors import LayerscopeError


def register(app: typer.Typer) -> None:
    @app.command("lens")
    def lens_cmd(
        model: Optional[str] = typer.Argument(None, help="Local model directory, hub id, or 'smollm2'. Default: embedded SmolLM2-135M-Instruct."),
        steps: int = typer.Option(250, "--steps", help="Tuned-lens training steps (0: untrained = logit lens)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in --out up to --steps."),
        train_tokens: int = typer.Option(4096, "--train-tokens", help="Cached calibration token positions (Wikipedia calibration split)."),
        eval_tokens: int = typer.Option(1024, "--eval-tokens", help="Held-out token positions (Wikipedia evaluation split)."),
        batch_tokens: int = typer.Option(32, "--batch-tokens", help="Token positions per training step."),
        lr: float = typer.Option(1e-3, "--lr"),
        seq_len: int = typer.Option(256, "--seq-len"),
        checkpoint_every: int = typer.Option(50, "--checkpoint-every"),
        lenses: bool = typer.Option(True, "--lenses/--no-lenses", help="Train/evaluate the lenses (off: neuron decoding only)."),
        neurons: Optional[str] = typer.Option(None, "--neurons", help="Blocks whose MLP neurons to decode: '3,7', '0-5' or 'all'."),
        promote: Optional[list[str]] = typer.Option(None, "--promote", help="Find the neurons that most promote this token (repeatable; '#<id>' for an id)."),
        top_k: int = typer.Option(10, "--top-k", help="Tokens per neuron."),
        seed: Seed = 0,
        out: Path = typer.Option(Path("layerscope-lens"), "--out", "-o", help="Output directory (lens.json, report.html, tuned_lens.*, checkpoint.*)."),
        force: Force = False,
        device: Device = "cpu",
        dtype: Dtype = None,
        trust_remote_code: TrustRemoteCode = False,
        quiet: Quiet = False,
    ) -> None:
        """Per-layer KL to the final prediction for the logit and the tuned lens, on held-out Wikipedia."""
        from layerscope.analysis.lenses import lens
        from layerscope.analysis.tuned_lens import ARTEFACT, CHECKPOINT
        from layerscope.model.subject import load_subject
        from layerscope.outputs import check_output, claim_output, output_dir

        if not lenses and neurons is None and not promote:
            raise LayerscopeError("--no-lenses leaves nothing to do: add --neurons or --promote")
        subject = load_subject(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        subject.require_lm_head("the logit/tuned lens" if lenses else "neuron decoding")
        sources = (subject.model_dir,)
        check_output(out, force=force, sources=sources)
        for name, v, lo in (("--steps", steps, 0), ("--train-tokens", train_tokens, 8), ("--eval-tokens", eval_tokens, 8),
                            ("--batch-tokens", batch_tokens, 1), ("--seq-len", seq_len, 2),
                            ("--checkpoint-every", checkpoint_every, 1)):
            if v < lo:  # checked before the checkpoint claims --out: a refused run leaves no folder
                raise LayerscopeError(f"{name} must be >= {lo}, got {v}")
        if neurons is not None:
            from layerscope.analysis.neurons import parse_layers

            parse_layers(neurons, subject.num_layers)
        if lenses:  # checkpoints and the tuned lens are written while training
            claim_output(out, [f"{n}.{e}" for n in (CHECKPOINT, ARTEFACT) for e in ("json", "safetensors")],
                         verb="lens", force=force, sources=sources)
        result = lens(subject, steps=steps, resume=resume, out=out if lenses else None, train_tokens=train_tokens,
                      eval_tokens=eval_tokens, seq_len=seq_len, batch_tokens=batch_tokens, lr=lr,
                      checkpoint_every=checkpoint_every, lenses=lenses, neurons=neurons, promote=promote,
                      top_k=top_k, seed=seed, progress=not quiet)
        page = result.report_html(f"layerscope lens: {subject.model_id}")
        with output_dir(out, verb="lens", force=force, sources=sources) as tmp:
            result.to_json(tmp / "lens.json")
            (tmp / "report.html").write_text(page, encoding="utf-8")
        if not quiet:
            if result.logit_kl is not None:
                typer.echo(result.summary())
            if result.neurons is not None:
                for tok, found in result.neurons.promote.items():
                    top = ", ".join(f"{n['layer']}:{n['neuron']} ({n['score']:.2f})" for n in found["neurons"][:10])
                    typer.echo(f"neurons promoting {found['token']!r}: {top}")
        typer.echo(f"wrote {out / 'lens.json'}, {out / 'report.html'}"
                   + (f", {result.artefact}" if result.artefact else ""))
