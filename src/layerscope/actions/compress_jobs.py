"""The independent evaluations of a compression verb (`sparsify`, `lowrank`), run here or as Ray tasks.

Applying a plan is a few jobs that share nothing but read-only inputs: compress a copy of the dense
model by the plan (and by the uniform plan it has to beat) and measure each one's selection perplexity;
then the dense and the shipped model's held-out perplexity. `Shared` holds those inputs (the Ray
payload, put in the object store once), `Job` says what one job does and `run_job` does it -- the same
function here and in a Ray worker (`engine.ray_pool.task_runner`), so `--ray` gives the local run's
numbers. The token streams are made on the caller, so workers need no dataset files and every job
reads exactly the tokens a local run reads. Each verb supplies only its compress function.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

SELECT, HELD_OUT = "select", "held_out"


@dataclass
class Shared:
    """What every job of one run reads."""

    dense: Any  # the dense model, never modified: every job compresses its own copy
    tokenizer: Any
    ids: Any  # calibration windows: the compressors' statistics
    texts: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # SELECT/HELD_OUT -> (protocol, token stream)
    options: dict[str, Any] = field(default_factory=dict)  # what the verb's compress function reads


@dataclass
class Job:
    """One independent evaluation: `compress(shared, copy, arg)` a copy of the dense model in place (it returns
    its numbers), else take `model`, else the dense model itself; then its perplexity on each of `texts`.
    `compress` must be a module-level function (a Ray task ships it by reference)."""

    compress: Callable[[Shared, Any, Any], dict[str, Any]] | None = None
    arg: Any = None
    model: Any = None
    texts: tuple[str, ...] = ()


def run_job(shared: Shared, job: Job) -> dict[str, Any]:
    """The numbers of one `Job` (plus "model": the compressed copy, when one was made)."""
    from layerscope.evaluation.perplexity import perplexity

    out: dict[str, Any] = {}
    model = job.model if job.model is not None else shared.dense
    if job.compress is not None:
        model = copy.deepcopy(shared.dense)
        out.update(job.compress(shared, model, job.arg))
        out["model"] = model
    for name in job.texts:
        protocol, stream = shared.texts[name]
        out[name] = perplexity(model, shared.tokenizer, protocol, ids=stream).perplexity
    return out


def eval_texts(tokenizer, *, compare: bool, evaluate: bool, select_tokens: int, eval_tokens: int) -> dict:
    """The token streams a run measures: SELECT (the calibration split -- what the compressors saw, never the
    held-out text) when plans are compared, HELD_OUT when the result is evaluated."""
    from layerscope.evaluation.perplexity import PerplexityProtocol, token_stream

    texts = {}
    if compare:
        proto = PerplexityProtocol(split="calibration", max_tokens=select_tokens)
        texts[SELECT] = (proto, token_stream(tokenizer, proto))
    if evaluate:
        proto = PerplexityProtocol(max_tokens=eval_tokens)
        texts[HELD_OUT] = (proto, token_stream(tokenizer, proto))
    return texts


@contextmanager
def job_runner(shared: Shared, ray: str | None) -> Iterator[Callable[[list[Job]], list[dict[str, Any]]]]:
    """A function running a list of jobs: one after the other here, or as Ray tasks on `ray` ("local" or an
    address). Both call `run_job` on the same inputs: the same numbers."""
    from layerscope.engine.ray_pool import task_runner

    with task_runner(shared, run_job, ray) as run:
        yield run


def compress_both(run, compress, plan_arg, uniform_arg, *, compare: bool) -> list[dict[str, Any]]:
    """Compress the plan and, with `compare`, the uniform plan (each with its selection perplexity), side by side."""
    jobs = [Job(compress=compress, arg=plan_arg, texts=(SELECT,) if compare else ())]
    if compare:
        jobs.append(Job(compress=compress, arg=uniform_arg, texts=(SELECT,)))
    return run(jobs)


def held_out_perplexities(run, model) -> tuple[float, float]:
    """Held-out perplexity of the dense model and of `model` (two independent jobs)."""
    base, got = run([Job(texts=(HELD_OUT,)), Job(model=model, texts=(HELD_OUT,))])
    return base[HELD_OUT], got[HELD_OUT]
