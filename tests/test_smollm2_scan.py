"""Integration on the real embedded SmolLM2-135M-Instruct (30 Llama blocks) and Wikipedia text."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import requires_smollm2

pytestmark = [pytest.mark.slow, requires_smollm2]


@pytest.fixture(scope="module")
def smol():
    from layerscope.model.loading import load_model

    return load_model(None)


def test_block_influence_on_real_model_matches_hooks(smol):
    """BI of all 30 blocks (last included) equals 1 - cos from forward hooks on a plain forward, to 1e-5."""
    from layerscope.data.windows import prepare_tokens
    from layerscope.metrics.scan import scan

    ids, _ = prepare_tokens(smol.tokenizer, "wikipedia", 1024, 256)
    table = scan(smol.model, ids, ["block_influence", "logit_lens"], tokenizer=smol.tokenizer, lens_tokens=64)
    blocks = smol.model.model.layers
    ins, outs = {}, {}
    hs = [b.register_forward_pre_hook(lambda m, a, k, i=i: ins.__setitem__(i, (a[0] if a else k["hidden_states"])),
                                      with_kwargs=True) for i, b in enumerate(blocks)]
    hs += [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        smol.model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    expected = [float((1 - F.cosine_similarity(ins[i].double(), outs[i].double(), dim=-1)).mean()) for i in range(30)]
    got = table.values("block_influence")
    assert len(got) == 30
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    kl = table.values("logit_lens_kl")
    assert kl[-1] == pytest.approx(0.0, abs=1e-5) and kl[0] > 1.0  # the first block is far from the output
    assert table.values("logit_lens_top1")[-1] == 1.0


def test_scan_cli_on_default_model(tmp_path, monkeypatch, capsys):
    """`layerscope scan` with no MODEL scans the embedded default and writes the three outputs."""
    import sys

    from layerscope.cli import app as cli

    out = tmp_path / "scan"
    monkeypatch.setattr(sys, "argv", ["layerscope", "scan", "--tokens", "512", "--seq-len", "256", "--out", str(out)])
    try:
        cli.main()
    except SystemExit as exc:  # main() returns on success; a SystemExit here must still be a success
        assert exc.code in (0, None)
    data = json.loads((out / "scores.json").read_text())
    prov = data["provenance"]
    assert prov["model_id"] == "smollm2" and prov["num_layers"] == 30 and prov["calibration_tokens"] == 512
    assert prov["calibration_source"] == "wikipedia:calibration" and len(prov["weights_sha256"]) == 64
    assert prov["skipped"] == {}
    html = (out / "report.html").read_text()
    # the report is complete and self-contained: every section is there, with plotly inlined (no network)
    for section in ("heatmap", "rank-heatmap", "block_influence", "Most often among the 5 least important"):
        assert section in html, section
    # no <script src=...> and no stylesheet link: plotly's inlined source mentions its CDN in strings, which the
    # HTML parser reads as script data, not as tags
    from html.parser import HTMLParser

    external = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if (tag == "script" and a.get("src")) or (tag == "link" and a.get("href")):
                external.append((tag, a))

    Tags().feed(html)
    assert external == []
    assert "least important" in capsys.readouterr().out
