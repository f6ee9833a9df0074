"""One perplexity protocol (issue 10): on a tokenizer that adds BOS, `eval`'s perplexity, the sweep's
and ablation's base loss measure the same windows (BOS + text each) as plain transformers' loss."""
from __future__ import annotations

import math

import pytest
import torch

from tiny_models import build, tiny_text


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A word-level tokenizer that, like Gemma's or Llama-3's, adds BOS by itself."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "eval.txt"
    p.write_text(tiny_text(3000))
    return p


def _independent_ppl(model, ids: torch.Tensor) -> float:
    """Plain transformers: mean next-token loss over the windows (labels = inputs), exponentiated."""
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in ids]
    return math.exp(float(torch.stack(losses).mean()))


def test_eval_perplexity_scores_every_window_from_bos_like_the_ablation_windows(bos_tokenizer, corpus):
    from layerscope.data.sources import load_texts
    from layerscope.data.windows import tokenize_windows
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity

    model = build("llama", bos_token_id=1)
    ctx, n = 16, 12
    ids = tokenize_windows(bos_tokenizer, load_texts(corpus), n_tokens=ctx * n, seq_len=ctx)  # the ablation windows
    assert (ids[:, 0] == 1).all()  # every window starts with BOS
    proto = PerplexityProtocol(dataset=str(corpus), context_length=ctx, stride=ctx, max_tokens=n * (ctx - 1))
    res = perplexity(model, bos_tokenizer, proto)
    assert res.protocol.bos_each_window is True and res.tokens_scored == n * (ctx - 1)
    assert res.perplexity == pytest.approx(_independent_ppl(model, ids), rel=1e-5)
    # The old protocol (one BOS for the whole stream) measures something else on the same text.
    old = perplexity(model, bos_tokenizer, proto.model_copy(update={"bos_each_window": False}))
    assert abs(old.perplexity - res.perplexity) > 1e-3


def test_ablation_base_loss_equals_eval_on_the_same_windows(bos_tokenizer, corpus):
    from layerscope.data.sources import load_texts
    from layerscope.data.windows import tokenize_windows
    from layerscope.engine.runner import BlockRunner, make_batches
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity, token_stream
    from layerscope.metrics.ground_truth.ablation import leave_one_out
    from layerscope.model.adapter import find_parts

    model = build("llama", bos_token_id=1)
    ctx, n = 16, 8
    ids = tokenize_windows(bos_tokenizer, load_texts(corpus), n_tokens=ctx * n, seq_len=ctx)
    runner = BlockRunner(find_parts(model), make_batches(ids, 4)[0])
    runner.capture()
    res = leave_one_out(runner, ["block"], layers=[0])
    proto = PerplexityProtocol(dataset=str(corpus), context_length=ctx, stride=ctx, max_tokens=n * (ctx - 1))
    stream = token_stream(bos_tokenizer, proto)  # BOS + text: the sweep's stream, resolved without a tokenizer
    ppl = perplexity(model, ids=stream, protocol=proto)
    assert ppl.protocol.bos_each_window is True
    assert ppl.mean_nll == pytest.approx(res.base_nll, rel=1e-5)
