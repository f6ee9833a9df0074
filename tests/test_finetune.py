"""`layerscope finetune`: LISA / IST callbacks hold no gradient or optimizer state for inactive blocks, resume
after an interruption ends with the same weights, LoRA on chosen blocks saves a plainly loadable model."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from layerscope.actions.finetune.ist import suppressed
from layerscope.actions.finetune.layers import optimizer_state_bytes
from layerscope.actions.finetune.lisa import LisaCallback, importance_weights
from layerscope.actions.finetune.lora import adapted_layers
from layerscope.actions.finetune.run import finetune
from layerscope.data.tasks import collate, task_dataset
from layerscope.plans.finetune import FinetunePlan, plan_finetune
from tiny_models import build, save_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text("\n\n".join(" ".join(f"w{int(i)}" for i in torch.randint(3, 120, (200,), generator=g))
                                for _ in range(20)))
    return str(path)


def _plan(corpus, method, **kw):
    base = dict(method=method, data=corpus, steps=6, n_layers=2, interval=2, seq_len=16, batch_size=2,
                train_examples=16, eval_examples=4, forgetting_tokens=0, save_every=2)
    return FinetunePlan(**{**base, **kw})


class _Check(TrainerCallback):
    """After every optimizer step: inactive blocks have no grad and no state; the state bytes match a count."""

    def __init__(self, lisa):
        self.lisa, self.seen = lisa, []

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        active = set(self.lisa.gate.active)
        expect = 0
        for i, block in enumerate(model.model.layers):
            for p in block.parameters():
                assert (p in opt.state) == (i in active) and (p.grad is not None) == (i in active)
                expect += (2 * p.numel() * 4 + 4) if i in active else 0
        outside = [p for n, p in model.named_parameters() if ".layers." not in n]
        expect += sum(2 * p.numel() * 4 + 4 for p in outside)
        self.seen.append((sorted(active), optimizer_state_bytes(opt), expect))


@pytest.mark.parametrize("trim", [True, False])
def test_lisa_inactive_blocks_hold_no_gradient_and_no_optimizer_state(corpus, trim):
    tok, model = tiny_tokenizer(), build("llama")
    data = task_dataset(corpus, tok, "train", n=16, seq_len=16)
    lisa = LisaCallback(n_layers=1, interval=2, seed=3, trim_state=trim)
    check = _Check(lisa) if trim else None
    args = TrainingArguments(output_dir="/tmp/unused", max_steps=6, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                      callbacks=[lisa] + ([check] if check else []))
    trainer.train()
    assert len({tuple(h["layers"]) for h in lisa.history}) > 1  # the active block changed
    if trim:
        assert all(got == want for _, got, want in check.seen)
    else:  # LMFlow-style: state of every block that was ever active stays
        ever = {i for h in lisa.history for i in h["layers"]}
        opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        held = {i for i, b in enumerate(model.model.layers) if any(p in opt.state for p in b.parameters())}
        assert held == ever and len(held) > 1


def test_importance_weights_follow_the_metric_ranking_and_lisa_draws_accordingly():
    w = importance_weights(values=[0.1, 0.5, 0.3, 0.9], direction="higher")
    assert list(w) == [0.25, 0.75, 0.5, 1.0]
    assert list(importance_weights(values=[0.1, 0.5, 0.3, 0.9], direction="lower")) == [1.0, 0.5, 0.75, 0.25]
    cb = LisaCallback(n_layers=1, interval=1, sampling="importance", weights=[0.1, 0.2, 0.3, 5.0], mix=0.5)
    cb.setup(build("llama"))  # weights are importance values: ranked, then mixed with the uniform draw
    assert cb.probs == pytest.approx([0.5 * w / 2.5 + 0.125 for w in (0.25, 0.5, 0.75, 1.0)])
    counts = [sum(cb.draw(s) == [i] for s in range(400)) for i in range(4)]
    assert counts == sorted(counts) and counts[3] > 1.5 * counts[0]


def test_suppression_factor_zero_equals_skipping_the_block():
    model = build("llama")
    x = torch.randint(3, 120, (2, 12))
    with suppressed(model.model.layers, [2], 0.0, "block"):
        got = model(input_ids=x).logits
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([b for i, b in enumerate(layers) if i != 2])
    for i, b in enumerate(model.model.layers):
        b.self_attn.layer_idx = i
    model.config.num_hidden_layers = 3
    want = model(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5)


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["lisa", "ist"])
def test_resume_after_interrupt_gives_the_same_final_weights(corpus, method, tmp_path):
    tok = tiny_tokenizer()
    plan = _plan(corpus, method, steps=4)
    whole = finetune(build("llama"), plan, tmp_path / "a", tokenizer=tok, progress=False, evaluate=False)
    with pytest.raises(KeyboardInterrupt):
        finetune(build("llama"), plan, tmp_path / "b", tokenizer=tok, progress=False, evaluate=False,
                 extra_callbacks=(_Interrupt(),))
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "model").exists()
    resumed = finetune(build("llama"), plan, tmp_path / "b", tokenizer=tok, progress=False, evaluate=False,
                       resume=True)
    assert resumed.costs["resumed_from"] == "checkpoint-2"
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], build("llama").state_dict()["model.layers.0.mlp.down_proj.weight"]) \
        or not torch.equal(a["model.layers.1.mlp.down_proj.weight"], build("llama").state_dict()["model.layers.1.mlp.down_proj.weight"])


def test_lora_on_chosen_blocks_saves_a_plain_merged_model_and_the_adapter(corpus, tmp_path):
    tok, model = tiny_tokenizer(), build("llama")
    plan = plan_finetune(model, tok, **{**_plan(corpus, "lora-selected").model_dump(exclude={"layers", "notes", "select", "by"}),
                                        "by": "spectrum_snr", "rank_by_score": True, "lr": 1e-2})
    assert len(plan.layers) == 2 and len(plan.weights) == 4
    res = finetune(model, plan, tmp_path / "out", tokenizer=tok, progress=False, evaluate=True)
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "checkpoints").exists()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == plan.layers
    loaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    x = torch.randint(3, 120, (2, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, res.model.eval()(input_ids=x).logits, atol=1e-5)
    base = build("llama")
    changed = {i for i in range(4) if not torch.equal(loaded.model.layers[i].self_attn.q_proj.weight,
                                                       base.model.layers[i].self_attn.q_proj.weight)}
    assert changed == set(plan.layers)
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["kind"] == "layerscope.finetune" and saved["costs"]["optimizer_state_bytes"] > 0


def test_adapted_layers_reads_back_the_chosen_blocks():
    from layerscope.actions.finetune.lora import lora_config, wrap_lora

    peft_model = wrap_lora(build("llama"), lora_config(build("llama"), [0, 3], rank=2))
    assert adapted_layers(peft_model) == [0, 3]


def run_cli(args, monkeypatch, capsys):
    from layerscope.cli import app as cli

    monkeypatch.setattr(sys, "argv", ["layerscope", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_dry_run_plan_file_roundtrip_and_report(corpus, tmp_path, monkeypatch, capsys):
    mdir = save_tiny("llama", tmp_path / "m")
    common = ["finetune", mdir, "--data", corpus, "--steps", "2", "--seq-len", "16", "--batch-size", "2",
              "--n-layers", "2", "--quiet"]
    code, yaml_text, err = run_cli([*common, "--plan", "freeze", "--layers", "1,3", "--dry-run"], monkeypatch, capsys)
    assert code == 0, err and "method: freeze" in yaml_text
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml_text.replace("forgetting_tokens: 8192", "forgetting_tokens: 0")
                         .replace("train_examples: 512", "train_examples: 8").replace("eval_examples: 256", "eval_examples: 4"))
    code, _, err = run_cli([*common, "--plan", plan_file, "--out", tmp_path / "o"], monkeypatch, capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "o" / "finetune.json").read_text())
    assert saved["plan"]["layers"] == [1, 3] and saved["plan"]["method"] == "freeze"
    code, _, err = run_cli(["report", tmp_path / "o" / "finetune.json", "--out", tmp_path / "r"], monkeypatch, capsys)
    assert code == 0, err and "Fine-tuning the layers that matter" in (tmp_path / "r" / "report.html").read_text()
    code, _, err = run_cli([*common, "--plan", "lisa", "--n-layers", "9", "--out", tmp_path / "bad"], monkeypatch, capsys)
    assert code != 0 and err.count("\n") == 1 and "9 active blocks" in err
