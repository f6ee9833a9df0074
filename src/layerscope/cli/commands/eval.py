"""`layerscope eval`: perplexity under an explicit protocol (causal LMs) or embedding fidelity (encoders)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import Device, Dtype, TrustRemoteCode
from layerscope.errors import LayerscopeError

DEFAULT_DATASETS = ("wikipedia:evaluation", "shakespeare:evaluation")


def _dataset_split(item: str) -> tuple[str, str]:
    name, sep, split = item.rpartition(":")
    if sep and split in ("calibration", "evaluation", "all") and name:
        return name, split
    return item, "evaluation"


def evaluate_causal(model, tokenizer, datasets, *, context: int, stride: int, tokens: int, batch_size: int,
                    model_id: str = "") -> list[dict]:
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity

    results = []
    for item in datasets:
        name, split = _dataset_split(item)
        protocol = PerplexityProtocol(dataset=name, split=split, context_length=context, stride=stride,
                                      max_tokens=tokens, batch_size=batch_size)
        results.append(perplexity(model, tokenizer, protocol, model_id=model_id).model_dump())
    return results


def run_lm_eval(model, tokenizer, tasks: str, batch_size: int, limit: Optional[int]) -> dict:
    """lm-evaluation-harness on the in-memory model (only if the `lm_eval` package is installed)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise LayerscopeError("--lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise LayerscopeError("--lm-eval expects a comma-separated list of task names")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit)
    except Exception as exc:  # task data missing offline, unknown task, ...
        raise LayerscopeError(f"lm-eval failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return json.loads(json.dumps(out.get("results", {}), default=str))


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: Optional[str] = typer.Argument(None, help="Model directory (e.g. written by `layerscope prune`), hub id, or 'smollm2'/'minilm'."),
        dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="NAME[:SPLIT] or a text file; repeatable. Default: wikipedia:evaluation and shakespeare:evaluation."),
        tokens: int = typer.Option(16384, "--tokens", help="Evaluated tokens per dataset."),
        context: int = typer.Option(512, "--context", help="Context length of each window."),
        stride: Optional[int] = typer.Option(None, "--stride", help="Window stride (default: the context length, disjoint windows)."),
        batch_size: int = typer.Option(4, "--batch-size"),
        reference: Optional[str] = typer.Option(None, "--reference", help="Encoders: the original model to compare embeddings with (default: the source recorded by prune)."),
        sentences: int = typer.Option(512, "--sentences", help="Encoders: number of evaluation sentences."),
        fast: bool = typer.Option(False, "--fast", help="Load with layerscope.load (skipped sublayers not computed)."),
        lm_eval_tasks: Optional[str] = typer.Option(None, "--lm-eval", help="Also run lm-evaluation-harness tasks (comma list; needs `pip install lm-eval` and the task data)."),
        lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", help="Examples per lm-eval task."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results as JSON to this file."),
        device: Device = "cpu",
        dtype: Dtype = None,
        trust_remote_code: TrustRemoteCode = False,
    ) -> None:
        """Token-level perplexity with a recorded protocol, or sentence-embedding fidelity for encoders."""
        from layerscope import __version__
        from layerscope.model.adapter import find_parts
        from layerscope.model.fast import read_pruned_json, skip_sublayers
        from layerscope.model.loading import load_model, resolve
        from layerscope.outputs import check_output_file, write_output_file

        if tokens < 2 or context < 2 or batch_size < 1 or sentences < 2:
            raise LayerscopeError("--tokens, --context, --batch-size and --sentences must be positive (>= 2)")
        stride = stride or context
        if not 1 <= stride <= context:
            raise LayerscopeError("--stride must be between 1 and --context")
        if lm_eval_tasks:
            try:
                import lm_eval  # noqa: F401
            except ImportError:
                raise LayerscopeError("--lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
        model_id, path = resolve(model)
        if out is not None:
            check_output_file(out, verb="eval", sources=(path,))  # before the work, not after it
        loaded = load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        record = read_pruned_json(path) if path is not None else None
        if fast and record and record.get("skipped_sublayers"):
            skip_sublayers(loaded.model, record["skipped_sublayers"])
        parts = find_parts(loaded.model)
        result: dict = {"model_id": loaded.model_id, "weights_sha256": loaded.weights_sha256,
                        "layerscope_version": __version__, "loaded_with": "layerscope.load" if fast else "transformers",
                        "pruned": ({k: record.get(k) for k in ("unit", "removed", "source")} if record else None)}
        if parts.has_lm_head:
            if loaded.tokenizer is None:
                raise LayerscopeError(f"{model_id} has no tokenizer; perplexity needs one")
            result["perplexity"] = evaluate_causal(loaded.model, loaded.tokenizer, dataset or DEFAULT_DATASETS,
                                                   context=context, stride=stride, tokens=tokens,
                                                   batch_size=batch_size, model_id=loaded.model_id)
            for r in result["perplexity"]:
                p = r["protocol"]
                typer.echo(f"{p['dataset']}:{p['split']}: perplexity {r['perplexity']:.4f} "
                           f"({r['tokens_scored']} tokens scored, context {p['context_length']}, stride {p['stride']})")
        else:
            from layerscope.evaluation.perplexity import (
                EmbeddingProtocol,
                embedding_fidelity,
            )

            ref_spec = reference or ((record or {}).get("source") or {}).get("path") or \
                ((record or {}).get("source") or {}).get("model_id")
            if not ref_spec:
                raise LayerscopeError(f"{model_id} is an encoder: pass --reference ORIGINAL_MODEL to compare embeddings with")
            ref = load_model(ref_spec, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
            tok = ref.tokenizer or loaded.tokenizer
            if tok is None:
                raise LayerscopeError("embedding fidelity needs a tokenizer")
            items = [_dataset_split(d) for d in (dataset or ["sentiment:evaluation"])]
            fids = []
            for name, split in items:
                proto = EmbeddingProtocol(dataset=name, split=split, sentences=sentences, batch_size=max(batch_size, 1) * 8)
                fid = embedding_fidelity(loaded.model, ref.model, tok, proto, model_id=loaded.model_id,
                                         reference_id=ref.model_id)
                fids.append(fid.model_dump())
                typer.echo(f"{name}:{split}: mean cosine {fid.mean_cosine:.4f} (min {fid.min_cosine:.4f}), "
                           f"recall@1 {fid.recall_at_1:.4f}, similarity Spearman {fid.similarity_spearman:.4f} "
                           f"over {fid.sentences} sentences vs {ref.model_id}")
            result["embedding_fidelity"] = fids
        if lm_eval_tasks:
            if not parts.has_lm_head:
                raise LayerscopeError("--lm-eval needs a causal language model")
            result["lm_eval"] = run_lm_eval(loaded.model, loaded.tokenizer, lm_eval_tasks, batch_size, lm_eval_limit)
            typer.echo(json.dumps(result["lm_eval"], indent=1)[:4000])
        if out is not None:
            write_output_file(out, result, verb="eval", sources=(path,))
            typer.echo(f"wrote {out}")
