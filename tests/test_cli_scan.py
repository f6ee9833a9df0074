"""`layerscope scan` from the command line: outputs, and one clear line for every kind of bad input."""
from __future__ import annotations

import json

import pytest
import torch

from cli_runner import run
from tiny_models import save_tiny, tiny_text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "calib.txt"
    p.write_text(tiny_text())
    return p


SCAN = ["scan", "--tokens", "256", "--seq-len", "32", "--quiet"]


def test_scan_cli_writes_json_csv_html(model_dir, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    before = sorted(p.name for p in model_dir.iterdir())
    code, stdout, err = run([*SCAN, model_dir, "--data", text_file, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"scores.json", "scores.csv", "report.html", ".layerscope-output.json"}
    data = json.loads((out / "scores.json").read_text())
    assert data["schema_version"] == "1.0"
    prov = data["provenance"]
    assert prov["num_layers"] == 4 and prov["calibration_tokens"] == 256 and len(prov["weights_sha256"]) == 64
    assert prov["calibration_source"] == str(text_file)
    assert "block_influence" in data["columns"] and "sink_mass@head" in data["columns"]
    header = (out / "scores.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["layer", "unit", "head"] and "block_influence" in header
    assert sorted(p.name for p in model_dir.iterdir()) == before  # the source is never written to


def test_scan_cli_selected_metrics(model_dir, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = run([*SCAN, model_dir, "--data", text_file, "-m", "block_influence,weights", "--out", out],
                       monkeypatch, capsys)
    assert code == 0, err
    cols = json.loads((out / "scores.json").read_text())["columns"]
    assert {c["metric"] for c in cols.values()} == {"block_influence", "zd_outlier_share", "stable_rank",
                                                    "effective_rank", "power_law_alpha"}


def _truncated(model_dir, tmp_path):
    bad = tmp_path / "truncated"
    bad.mkdir()
    for f in model_dir.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    return bad


def _garbage(model_dir, tmp_path):
    bad = tmp_path / "garbage"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(b"\x00\x01not a safetensors file" if f.suffix == ".safetensors" else f.read_bytes())
    return bad


def _config_only(model_dir, tmp_path):
    bad = tmp_path / "config-only"
    bad.mkdir()
    (bad / "config.json").write_text((model_dir / "config.json").read_text())
    return bad


def _pickle_only(model_dir, tmp_path):
    bad = tmp_path / "pickle-only"
    bad.mkdir()
    (bad / "config.json").write_text((model_dir / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"pickled")
    return bad


def _unknown_arch(model_dir, tmp_path):
    bad = tmp_path / "unknown-arch"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "definitely_not_a_model"
    cfg["architectures"] = ["DefinitelyNotAModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


def _unsupported_family(model_dir, tmp_path):
    import transformers

    bad = tmp_path / "mamba"
    model = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=128, hidden_size=16, num_hidden_layers=2,
                                                                   state_size=4))
    model.save_pretrained(bad)
    return bad


def _nan_model(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(model_dir / "model.safetensors"))
    key = next(k for k in weights if "layers.1.mlp.down_proj" in k)
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return bad


def _text(content):
    def make(model_dir, tmp_path):
        p = tmp_path / "data.txt"
        p.write_text(content)
        return p

    return make


CASES = [
    ("nonexistent path", lambda m, t: [t / "no-such-model"], "does not exist"),
    ("truncated safetensors", lambda m, t: [_truncated(m, t)], "corrupt or truncated"),
    ("garbage safetensors", lambda m, t: [_garbage(m, t)], "corrupt or truncated"),
    ("config without weights", lambda m, t: [_config_only(m, t)], "no weights"),
    ("pickle weights only", lambda m, t: [_pickle_only(m, t)], "safetensors only"),
    ("unknown architecture", lambda m, t: [_unknown_arch(m, t)], "unsupported architecture"),
    ("unsupported family", lambda m, t: [_unsupported_family(m, t)], "no attention module"),
    ("empty text", lambda m, t: [m, "--data", _text("")(m, t)], "empty"),
    ("too-short text", lambda m, t: [m, "--data", _text("w1 w2 w3")(m, t)], "too short"),
    ("unknown metric", lambda m, t: [m, "-m", "block_influence,bogus"], "unknown metric 'bogus'"),
    ("NaN weights", lambda m, t: [_nan_model(m, t)], "non-finite weights"),
    ("NaN activations", lambda m, t: [_nan_model(m, t), "-m", "block_influence"], "non-finite activations"),
]


@pytest.mark.parametrize("name,make,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line(name, make, message, model_dir, text_file, tmp_path, monkeypatch, capsys):
    args = make(model_dir, tmp_path)
    if "--data" not in args:
        args = [*args, "--data", text_file]
    out = tmp_path / "out"
    code, stdout, err = run([*SCAN, *args, "--out", out], monkeypatch, capsys)
    assert code != 0
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("layerscope: error:") and message in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()  # nothing partial left behind


def test_output_inside_model_dir_refused(model_dir, text_file, monkeypatch, capsys):
    code, _, err = run([*SCAN, model_dir, "--data", text_file, "--out", model_dir / "scan"], monkeypatch, capsys)
    assert code != 0 and "inside the source model directory" in err
    assert not (model_dir / "scan").exists()


def test_trust_remote_code_needs_flag(tmp_path, monkeypatch, capsys):
    d = tmp_path / "remote"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "custom_thing", "auto_map": {"AutoConfig": "cfg.CustomConfig"}}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, d / "model.safetensors")  # valid weights: the flag is what stops it
    (d / "cfg.py").write_text("raise SystemExit('custom code ran without --trust-remote-code')\n")
    code, _, err = run(["scan", d, "--quiet"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "needs custom code" in err and "--trust-remote-code" in err
