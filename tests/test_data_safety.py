"""Nothing lost (issue 10): the one output policy under every output-path case, the three defects
reproduced on the old code (scan --out wiping the user's folder or replacing a file; missing MLP
tensors scanning with exit 0; Ctrl-C ignored or exiting 0), and determinism of scan/agree/quantize."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_runner import run
from tiny_models import save_tiny, tiny_text


pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(code, err, exit_code=2):
    assert code == exit_code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def snapshot(root: Path) -> dict:
    """Every file under root (hidden ones included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "calib.txt"
    p.write_text(tiny_text())
    return p


@pytest.fixture()
def scan_args(model_dir, text_file):
    return ["scan", model_dir, "--data", text_file, "--tokens", 64, "--seq-len", 16, "-m", "block_influence", "-q"]


@pytest.fixture(autouse=True)
def no_html(monkeypatch):
    import layerscope.report

    monkeypatch.setattr(layerscope.report, "render_report", lambda *a, **k: "<html>" + "x" * 200_000 + "</html>")


# ------------------------------------------------------------------ the three reproduced defects


def test_scan_out_on_a_folder_of_user_files_keeps_them_byte_identical(scan_args, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    (runs / "sub").mkdir(parents=True)
    (runs / "notes.txt").write_text("mine")
    (runs / "sub" / "data.bin").write_bytes(os.urandom(64))
    (runs / "scores.json").write_text("my own scores")  # collides with an output name
    before = snapshot(runs)
    one_line_error(*run([*scan_args, "--out", runs], monkeypatch, capsys)[::2])
    assert snapshot(runs) == before
    code, _, err = run([*scan_args, "--out", runs, "--force"], monkeypatch, capsys)  # never replaces a user file
    one_line_error(code, err)
    assert "scores.json" in err and snapshot(runs) == before
    (runs / "scores.json").unlink()
    before = snapshot(runs)
    code, _, err = run([*scan_args, "--out", runs, "--force"], monkeypatch, capsys)
    assert code == 0, err
    after = snapshot(runs)
    assert {k: after[k] for k in before} == before and "scores.json" in after  # added next to them


def test_scan_out_on_a_file_is_refused_and_the_file_untouched(scan_args, tmp_path, monkeypatch, capsys):
    f = tmp_path / "some_file"
    f.write_bytes(b"precious")
    one_line_error(*run([*scan_args, "--out", f], monkeypatch, capsys)[::2])
    assert f.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["some_file"]


def test_scan_out_containing_the_model_is_refused_and_the_model_intact(tmp_path, text_file, monkeypatch, capsys):
    model = save_tiny("llama", tmp_path / "models" / "m")
    before = snapshot(tmp_path)
    code, _, err = run(["scan", model, "--data", text_file, "--tokens", 64, "--seq-len", 16, "-q", "--out",
                        tmp_path / "models", "--force"], monkeypatch, capsys)
    one_line_error(code, err)
    assert "contains the source model" in err and snapshot(tmp_path) == before
    code, _, err = run(["scan", model, "--data", text_file, "-q", "--out", model / "inside"], monkeypatch, capsys)
    one_line_error(code, err)
    assert snapshot(tmp_path) == before


def test_missing_mlp_tensors_are_an_error_not_a_scan(tmp_path, text_file, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    model = save_tiny("llama", tmp_path / "m")
    sd = load_file(model / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layers.3.mlp." not in k}, model / "model.safetensors",
              metadata={"format": "pt"})
    args = ["scan", model, "--data", text_file, "--tokens", 64, "--seq-len", 16, "-q", "--out", tmp_path / "o"]
    code, _, err = run(args, monkeypatch, capsys)
    one_line_error(code, err)
    assert "model.layers.3.mlp.down_proj.weight" in err and not (tmp_path / "o").exists()
    code, _, err = run([*args, "--allow-missing"], monkeypatch, capsys)
    assert code == 0 and "warning" in err
    notes = json.loads((tmp_path / "o" / "scores.json").read_text())["provenance"]["notes"]
    assert any("model.layers.3.mlp.up_proj.weight" in n for n in notes)


SLOW_SCAN = """
import importlib, sys, time
from pathlib import Path
s = importlib.import_module("layerscope.metrics.scan")
real, started = s._run_block, Path(sys.argv[1])
def slow(*a, **k):
    started.touch()          # the block pass has started: the parent may press Ctrl-C now
    time.sleep(0.3)
    return real(*a, **k)
s._run_block = slow
from layerscope.cli.app import main
sys.argv = ["layerscope", *sys.argv[2:]]
main()
"""


def test_ctrl_c_during_the_block_pass_exits_130_with_one_line_and_no_output(model_dir, text_file, tmp_path):
    started, out = tmp_path / "started", tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__import__("layerscope").__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-c", SLOW_SCAN, str(started), "scan", str(model_dir), "--data",
                          str(text_file), "--tokens", "64", "--seq-len", "16", "-q", "--out", str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # a loaded CI machine can take minutes to import torch + transformers
    while not started.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None and started.exists(), p.communicate()
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["layerscope: interrupted"] and "wrote" not in stdout
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["started"]


# ------------------------------------------------------------------ read-only folder, full disk, failing writer


def _mount_tmpfs(where: Path, *opts: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def test_read_only_folder_gives_one_line_and_changes_nothing(scan_args, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    if _mount_tmpfs(ro, "size=1m"):
        (ro / "mine.txt").write_text("mine")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    else:
        ro.mkdir(exist_ok=True)
        (ro / "mine.txt").write_text("mine")
        ro.chmod(0o555)
    try:
        before = snapshot(ro)
        code, _, err = run([*scan_args, "--out", ro / "run"], monkeypatch, capsys)
        one_line_error(code, err)
        assert "cannot write" in err and snapshot(ro) == before
    finally:
        _umount(ro)
        ro.chmod(0o755)


def test_full_disk_gives_one_line_and_leaves_nothing_partial(scan_args, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    if not _mount_tmpfs(full, "size=128k"):
        pytest.skip("needs root to mount a tiny tmpfs (the failing-writer test covers the same path)")
    try:
        (full / "mine.txt").write_text("mine")
        before = snapshot(full)
        code, _, err = run([*scan_args, "--out", full / "run"], monkeypatch, capsys)  # the report is 200 kB
        one_line_error(code, err)
        assert "No space left" in err and snapshot(full) == before
        assert sorted(p.name for p in full.iterdir()) == ["mine.txt"]  # no staging folder left behind
    finally:
        _umount(full)


def test_failing_writer_mid_output_leaves_no_complete_looking_result(scan_args, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    assert run([*scan_args, "--out", runs], monkeypatch, capsys)[0] == 0
    first = snapshot(runs)
    real = os.replace

    def replace(src, dst, *a, **k):  # the disk fills up while finished results move into place
        if Path(dst) == runs / "scores.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run([*scan_args, "--out", runs, "--seed", 1], monkeypatch, capsys)
    monkeypatch.setattr(os, "replace", real)
    one_line_error(code, err)
    marker = json.loads((runs / ".layerscope-output.json").read_text())
    assert marker["complete"] is False  # an interrupted update says so
    assert not [p for p in runs.iterdir() if p.name.endswith(".partial")]
    assert set(snapshot(runs)) == set(first)


# ------------------------------------------------------------------ determinism


def _values(path: Path):
    skip = ("created", "wall_time_s", "wall_time", "timings_s", "seconds", "memory", "prepared_at",
            "out")  # where it was written is not a value

    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if k not in skip}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o
    return clean(json.loads(path.read_text()))


@pytest.mark.parametrize("verb", ["scan", "agree", "quantize"])
def test_same_inputs_and_seed_give_identical_values(verb, model_dir, text_file, tmp_path, monkeypatch, capsys):
    args = {
        "scan": (["scan", model_dir, "--data", text_file, "--tokens", 128, "--seq-len", 16, "-q"], "scores.json"),
        "agree": (["agree", model_dir, "--data", text_file, "--second-corpus", "none", "--tokens", 96, "--seq-len", 16,
                   "--ablation-tokens", 48, "--ablation-data", "calibration", "--truth", "ablation_kl,taylor",
                   "--bootstrap", 5, "--groups", 2, "--no-extras", "-q"], "agreement.json"),
        "quantize": (["quantize", model_dir, "--budget", "4", "--bits", "2,4,8", "--tokens", 64, "--no-eval",
                      "--no-save-model", "-q"], "quantize.json"),
    }[verb]
    for name in ("a", "b"):
        code, _, err = run([*args[0], "--out", tmp_path / name], monkeypatch, capsys)
        assert code == 0, err
    a, b = _values(tmp_path / "a" / args[1]), _values(tmp_path / "b" / args[1])
    assert a == b
    if verb == "scan":
        assert (tmp_path / "a" / "scores.csv").read_bytes() == (tmp_path / "b" / "scores.csv").read_bytes()
