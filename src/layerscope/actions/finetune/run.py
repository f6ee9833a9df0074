"""`finetune`: apply a FinetunePlan with a plain `transformers.Trainer` and the layer callbacks, then measure.

Checkpoints (model, optimizer, scheduler, RNG, data position and the callbacks' own state) go to
``<out>/checkpoints`` every `plan.save_every` steps; after Ctrl-C, ``resume=True`` continues from the last one
and ends with the same weights as an uninterrupted run (LISA's and IST's draws depend only on the seed, the step
and saved state). The output directory gets ``model/`` (plain `from_pretrained`; LoRA merged), ``adapter/`` (LoRA
plans), ``finetune.json``, ``report.html`` and ``layerscope_plan.yaml``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from layerscope.actions.finetune.layers import optimizer_state_bytes, trainable_bytes
from layerscope.actions.finetune.meter import CostMeter
from layerscope.errors import LayerscopeError
from layerscope.plans.finetune import FinetunePlan

CALLBACK_STATE = "layerscope_callback.json"


class _SaveCallbackState(TrainerCallback):
    """Writes the selection callback's state next to each Trainer checkpoint."""

    def __init__(self, cb: Any):
        self.cb = cb

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir() and hasattr(self.cb, "state_dict"):
            (ckpt / CALLBACK_STATE).write_text(json.dumps(self.cb.state_dict()), encoding="utf-8")


def prepare(model: torch.nn.Module, plan: FinetunePlan, train_data=None, collator=None):
    """(model to train, selection callback or None) for the plan's method."""
    from layerscope.actions.finetune.layers import freeze_blocks

    m = plan.method
    for p in model.parameters():
        p.requires_grad_(True)
    if m in ("lora-selected", "lora-all"):
        from layerscope.actions.finetune.lora import lora_config, wrap_lora

        weights = plan.weights if plan.rank_by_score else None
        cfg = lora_config(model, plan.layers if m == "lora-selected" else None, plan.lora_rank, plan.lora_alpha, weights)
        return wrap_lora(model, cfg), None
    if m == "freeze":
        freeze_blocks(model, plan.layers)
        return model, None
    if m in ("lisa", "lisa-importance"):
        from layerscope.actions.finetune.lisa import LisaCallback

        return model, LisaCallback(plan.n_layers, plan.interval, "importance" if m == "lisa-importance" else "uniform",
                                   weights=plan.weights, mix=plan.mix, seed=plan.seed, trim_state=plan.trim_state)
    if m == "ist":
        from layerscope.actions.finetune.ist import IstCallback

        return model, IstCallback(train_data, collator, n_layers=plan.n_layers, interval=plan.interval,
                                  batch_size=plan.batch_size, seed=plan.seed, trim_state=plan.trim_state)
    return model, None


def _last_checkpoint(ckpt: Path) -> Path | None:
    found = [(int(p.name.split("-")[1]), p) for p in ckpt.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


def train(model: torch.nn.Module, tokenizer: Any, plan: FinetunePlan, ckpt_dir: Path | None = None,
          resume: bool = False, progress: bool = True, extra_callbacks: tuple = ()) -> tuple[torch.nn.Module, dict]:
    """Train `model` under `plan`; returns (trained model, PEFT-wrapped for LoRA plans; the costs and callback info)."""
    from layerscope.data.tasks import collate, task_dataset

    plan.check()
    torch.manual_seed(plan.seed)
    data = task_dataset(plan.data, tokenizer, "train", n=plan.train_examples, seq_len=plan.seq_len, seed=plan.seed)
    pad = getattr(tokenizer, "pad_token_id", None)
    collator = partial(collate, pad_id=pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0))
    model.train()
    model, cb = prepare(model, plan, data, collator)
    meter = CostMeter()
    last = None
    if resume:
        last = _last_checkpoint(ckpt_dir) if ckpt_dir is not None else None
        if last is None:
            raise LayerscopeError(f"nothing to resume: no checkpoint in {ckpt_dir}")
        if cb is not None and (last / CALLBACK_STATE).exists():
            cb.load_state_dict(json.loads((last / CALLBACK_STATE).read_text(encoding="utf-8")))
    saving = ckpt_dir is not None
    args = TrainingArguments(
        output_dir=str(ckpt_dir) if saving else tempfile.gettempdir(), max_steps=plan.steps,
        per_device_train_batch_size=plan.batch_size, learning_rate=plan.lr, weight_decay=plan.weight_decay,
        warmup_steps=plan.warmup_steps, lr_scheduler_type="linear", logging_steps=1, optim="adamw_torch",
        save_strategy="steps" if saving else "no", save_steps=plan.save_every, save_total_limit=2, seed=plan.seed,
        data_seed=plan.seed, report_to=[], disable_tqdm=not progress, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=not next(model.parameters()).is_cuda, max_grad_norm=1.0)
    callbacks = [meter] + ([cb, _SaveCallbackState(cb)] if cb is not None else []) + list(extra_callbacks)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks)
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    finally:
        meter.stop()
    info = meter.summary()
    info.update(train_time_s=time.perf_counter() - t0, train_tokens_per_step=plan.batch_size * plan.seq_len
                if data.kind == "lm" else None, train_examples=len(data), train_tokens=data.tokens,
                final_optimizer_state_bytes=optimizer_state_bytes(trainer.optimizer),
                trainable_bytes_end=trainable_bytes(model), resumed_from=str(last.name) if last else None)
    if cb is not None:
        info["selection"] = cb.describe()
    return model, info


def finetune(model: Any = None, plan: FinetunePlan | None = None, out: str | Path | None = None, *,
             tokenizer: Any = None, resume: bool = False, progress: bool = True, force: bool = False,
             evaluate: bool = True, baseline: bool = True, keep_checkpoints: bool = False,
             device: str | None = None, dtype: Any = None, trust_remote_code: bool = False,
             extra_callbacks: tuple = ()):
    """Fine-tune `model` with `plan`, evaluate the task (before too, with `baseline`) and forgetting, and write the
    result to `out` (if given)."""
    from layerscope.actions.finetune.result import FinetuneResult
    from layerscope.data.tasks import forgetting, task_dataset, task_metric
    from layerscope.model.subject import load_subject
    from layerscope.outputs import claim_output, output_dir

    if plan is None:
        raise LayerscopeError("finetune needs a plan (plan_finetune(...) or FinetunePlan.from_file)")
    plan.check()
    from layerscope.model.subject import Subject

    subject = model if isinstance(model, Subject) else load_subject(
        model, tokenizer, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    subject.require_lm_head("fine-tuning")
    tok = subject.tokenizer
    ckpt = None
    if out is not None:
        out = claim_output(out, ["checkpoints"], verb="finetune", force=force, sources=(subject.model_dir,))
        ckpt = out / "checkpoints"
    held = task_dataset(plan.data, tok, "eval", n=plan.eval_examples, seq_len=plan.seq_len, seed=plan.seed)
    base_metric = task_metric(subject.model, plan.data, tok, data=held).to_dict() if evaluate and baseline else None
    trained, info = train(subject.model, tok, plan, ckpt, resume=resume, progress=progress,
                          extra_callbacks=extra_callbacks)
    is_peft = trained is not subject.model
    final = trained.merge_and_unload() if is_peft and out is None else trained
    result = FinetuneResult(model_id=subject.model_id, weights_sha256=subject.weights_sha256,
                            num_layers=subject.num_layers, plan=plan.to_dict(), costs=info, baseline=base_metric)
    if evaluate:
        result.task = task_metric(final, plan.data, tok, data=held).to_dict()
        if plan.forgetting_tokens:
            result.forgetting = forgetting(final, tok, tokens=plan.forgetting_tokens)
    if out is not None:
        with output_dir(out, verb="finetune", force=True, sources=(subject.model_dir,)) as tmp:
            if is_peft:
                trained.save_pretrained(tmp / "adapter")
                final = trained.merge_and_unload()
            final.save_pretrained(tmp / "model")
            tok.save_pretrained(tmp / "model")
            plan.save(tmp / "model" / "layerscope_plan.yaml")
            plan.save(tmp / "layerscope_plan.yaml")
            result.to_json(tmp / "finetune.json")
            (tmp / "report.html").write_text(result.report_html(f"layerscope finetune: {subject.model_id}"),
                                             encoding="utf-8")
        if not keep_checkpoints and ckpt is not None and ckpt.exists():
            shutil.rmtree(ckpt)  # ours (claimed in the marker); only needed to resume an unfinished run
    result.model = final
    return result
