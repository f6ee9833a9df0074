"""Task datasets and metrics (data/tasks.py) on a tiny random model and the word-level tiny tokenizer."""
from __future__ import annotations

import math

import pytest
import torch

from layerscope.data.tasks import answer_accuracy, collate, task_dataset, task_metric
from layerscope.errors import LayerscopeError
from tiny_models import build, tiny_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(f"w{int(i)}" for i in torch.randint(3, 120, (80,), generator=g)) for _ in range(10)]
    path.write_text("\n\n".join(docs))
    return path, docs


def test_file_task_holds_out_every_fifth_document(corpus):
    path, docs = corpus
    tok = tiny_tokenizer()
    train = task_dataset(str(path), tok, "train", n=4, seq_len=16)
    held = task_dataset(str(path), tok, "eval", n=4, seq_len=16)
    first_held = tok(docs[4], add_special_tokens=False)["input_ids"][:16]
    assert held[0]["input_ids"].tolist() == first_held
    assert train[0]["input_ids"].tolist() == tok(docs[0], add_special_tokens=False)["input_ids"][:16]
    assert train[0]["labels"].tolist() == train[0]["input_ids"].tolist()


def test_lm_task_metric_equals_mean_next_token_nll(corpus):
    path, _ = corpus
    tok, model = tiny_tokenizer(), build("llama")
    held = task_dataset(str(path), tok, "eval", n=3, seq_len=16)
    score = task_metric(model, str(path), tok, data=held)
    x = torch.stack([e["input_ids"] for e in held.examples])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), -1)
    ref = -logp.gather(-1, x[:, 1:, None]).mean()
    assert score.metric == "heldout_loss" and not score.higher_is_better
    assert math.isclose(score.value, float(ref), rel_tol=1e-4)


def test_sentiment_task_scores_only_the_answer_token_and_accuracy_matches_manual():
    tok, model = tiny_tokenizer(), build("llama")
    answers = {"positive": "w5", "negative": "w6"}
    held = task_dataset("sentiment", tok, "eval", n=20, answers=answers)
    assert sorted(set(held.labels)) == ["negative", "positive"] and held.labels.count("positive") == 10
    for e, lab in zip(held.examples, held.labels):
        scored = (e["labels"] != -100).nonzero().flatten().tolist()
        assert scored == [len(e["input_ids"]) - 1] and int(e["labels"][-1]) == held.answer_ids[lab]
    acc, _ = answer_accuracy(model, held, batch_size=7)  # padding across batches must not change predictions
    manual = 0
    with torch.no_grad():
        for e, lab in zip(held.examples, held.labels):
            lp = torch.log_softmax(model(input_ids=e["input_ids"][None, :-1]).logits[0, -1], -1)
            pred = "positive" if lp[held.answer_ids["positive"]] > lp[held.answer_ids["negative"]] else "negative"
            manual += pred == lab
    assert acc == pytest.approx(manual / len(held))
    assert task_metric(model, "sentiment", tok, data=held).metric == "accuracy"


def test_answers_that_collide_or_are_unknown_are_refused():
    tok = tiny_tokenizer()
    with pytest.raises(LayerscopeError, match="unknown token"):
        task_dataset("sentiment", tok, "eval", n=16)  # " positive" is not a word of the tiny vocabulary
    with pytest.raises(LayerscopeError, match="same token"):
        task_dataset("sentiment", tok, "eval", n=16, answers={"positive": "w5", "negative": "w5 w6"})


def test_collate_pads_right_with_ignored_labels():
    b = collate([{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, -100, 7]),
                  "attention_mask": torch.ones(3, dtype=torch.long)},
                 {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long)}])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
