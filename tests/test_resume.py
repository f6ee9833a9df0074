"""Interrupt and resume (issue 10): a long verb interrupted by Ctrl-C after a checkpoint, then rerun
with --resume, gives exactly the numbers of an uninterrupted run; Ctrl-C exits 130 with one line."""
from __future__ import annotations

import json

import pytest

from cli_runner import run
from tiny_models import save_tiny, tiny_text


@pytest.fixture(autouse=True)
def no_html(monkeypatch):
    """The HTML report (plotly) costs seconds and is tested elsewhere; here only the numbers matter."""
    import layerscope.report

    monkeypatch.setattr(layerscope.report, "render_report", lambda *a, **k: "<html></html>")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "text.txt"
    p.write_text(tiny_text(6000))
    return p


def interrupt_after(monkeypatch, n: int):
    """Ctrl-C right after the n-th checkpoint write (as if the user pressed it then)."""
    from layerscope.checkpoint import Checkpoint

    real = Checkpoint.put
    calls = {"n": 0}

    def put(self, key, value):
        real(self, key, value)
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "put", put)
    return lambda: monkeypatch.setattr(Checkpoint, "put", real)


def values(path, skip=("created", "wall_time_s", "wall_time", "timings_s", "seconds", "memory")):
    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if k not in skip}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o
    return clean(json.loads(path.read_text()))


def _resume_equals_uninterrupted(args, name, tmp_path, monkeypatch, capsys, after=2):
    full, part = tmp_path / "full", tmp_path / "part"
    code, _, err = run([*args, "--out", full], monkeypatch, capsys)
    assert code == 0, err
    restore = interrupt_after(monkeypatch, after)
    code, _, err = run([*args, "--out", part], monkeypatch, capsys)
    restore()
    assert code == 130 and err.strip().splitlines() == ["layerscope: interrupted"]
    assert not (part / name).exists()  # nothing partial that looks complete
    code, _, err = run([*args, "--out", part, "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert values(part / name) == values(full / name)
    assert not any(p.name.endswith(".checkpoint.json") for p in part.iterdir())  # removed once done
    return values(full / name)


def test_scan_ablation_resumes_to_the_same_numbers(model_dir, text_file, tmp_path, monkeypatch, capsys):
    args = ["scan", model_dir, "--data", text_file, "-m", "ablation,block_influence", "--tokens", 128, "--seq-len", 16,
            "--option", f"ablation_dataset={text_file}", "--option", "ablation_tokens=96", "--option",
            "ablation_batch_size=1", "--option", "ablation_greedy=2", "--quiet"]
    data = _resume_equals_uninterrupted(args, "scores.json", tmp_path, monkeypatch, capsys)
    assert data["columns"]["ablation_kl"]["values"][0] > 0


def test_resume_refuses_a_checkpoint_made_with_other_inputs(model_dir, text_file, tmp_path, monkeypatch, capsys):
    args = ["scan", model_dir, "--data", text_file, "-m", "ablation", "--tokens", 128, "--seq-len", 16,
            "--option", f"ablation_dataset={text_file}", "--option", "ablation_tokens=64", "--quiet", "--out",
            tmp_path / "r"]
    restore = interrupt_after(monkeypatch, 1)
    assert run(args, monkeypatch, capsys)[0] == 130
    restore()
    code, _, err = run([*args[:-2], "--seed", 3, "--out", tmp_path / "r", "--resume"], monkeypatch, capsys)
    assert code == 2 and "seed differ" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["scan", model_dir, "--data", text_file, "--tokens", 64, "--seq-len", 16, "--quiet",
                        "--out", tmp_path / "none", "--resume"], monkeypatch, capsys)
    assert code == 2 and "nothing to resume" in err


def test_sweep_resumes_to_the_same_numbers(model_dir, text_file, tmp_path, monkeypatch, capsys):
    args = ["sweep", model_dir, "--remove", "0..2", "--orders", "block_influence,random:2,greedy", "--dataset",
            text_file, "--split", "all", "--tokens", 96, "--context", 16, "--greedy-data", text_file,
            "--greedy-tokens", 64, "--quiet"]
    data = _resume_equals_uninterrupted(args, "sweep.json", tmp_path, monkeypatch, capsys, after=3)
    assert data["greedy"]["perplexity"] and data["random"]["perplexity"]


def test_agree_resumes_to_the_same_numbers(model_dir, text_file, tmp_path, monkeypatch, capsys):
    args = ["agree", model_dir, "--data", text_file, "--second-corpus", "none", "--tokens", 128, "--seq-len", 16,
            "--ablation-tokens", 64, "--ablation-data", "calibration", "--truth", "ablation_kl,taylor",
            "--bootstrap", 5, "--groups", 2, "--no-extras", "--option", "ablation_batch_size=1", "--quiet"]
    data = _resume_equals_uninterrupted(args, "agreement.json", tmp_path, monkeypatch, capsys, after=3)
    assert data["recommendation"]
    assert values(tmp_path / "part" / "scores.json") == values(tmp_path / "full" / "scores.json")
