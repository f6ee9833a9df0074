"""HTML report and static plots (no browser): built from a real scan of a tiny random Llama."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

from layerscope.report import (
    HEAD_METRICS,
    importance_normalise,
    plotly_chart,
    register_section,
    render_report,
    sections,
    unregister_section,
    write_report,
)
from layerscope.metrics.scan import scan
from layerscope.metrics.table import Provenance, ScoreColumn, ScoreTable

PLOTLY_BUNDLE = re.compile(r'<script id="ls-plotlyjs">.*?</script>', re.S)
CHART_DIV = re.compile(r'<div class="ls-chart" id="([^"]+)" data-chart="([^"]+)"')
SPEC = re.compile(r'<script type="application/json" class="ls-chart-spec">(.*?)</script>', re.S)
# Anything that would make a browser fetch a resource from elsewhere.
EXTERNAL = re.compile(
    r"""(?:\b(?:src|href|srcset|action|poster|data)\s*=\s*["']?\s*|@import\s+(?:url\(\s*)?["']?\s*|url\(\s*["']?\s*)"""
    r"""(?:https?:|ftp:)?//""",
    re.I,
)


def tiny_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=128, max_position_embeddings=64))


def scan_tiny(model, metrics="all"):
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    return scan(model, ids, metrics=metrics, tokens=64, seq_len=16, batch_size=2, lens_tokens=32)


@pytest.fixture(scope="module")
def table() -> ScoreTable:
    return scan_tiny(tiny_llama())


@pytest.fixture(scope="module")
def html(table) -> str:
    return render_report(table)


def markup(html: str) -> str:
    """The document without the inlined plotly.js bundle (which mentions URLs in its code)."""
    return PLOTLY_BUNDLE.sub("<script></script>", html)


def chart_names(html: str) -> list[str]:
    return [name for _, name in CHART_DIV.findall(html)]


# --------------------------------------------------------------------------- full report
def test_document_shape(html):
    assert html.lstrip().startswith("<!DOCTYPE html>")
    assert html.rstrip().endswith("</html>")
    assert html.count('<script id="ls-plotlyjs">') == 1  # the bundle once for the whole page
    assert "Plotly.newPlot" in html
    assert "layerscope report: LlamaForCausalLM" in html


def test_every_chart_container(html, table):
    names = chart_names(html)
    assert "heatmap" in names and "rank-heatmap" in names
    for group in ("block_influence", "relative_contribution", "angular_distance", "massive_activations",
                  "mlp_sparsity", "logit_lens_kl_drop", "stable_rank", "sink_mass"):
        assert f"depth-{group}" in names
    for m in HEAD_METRICS:
        assert f"heads-{m}" in names
    # angular distance windows share one chart; windows that span past the last block are empty
    assert not any(n.startswith("depth-angular_distance_n") for n in names)
    assert len(names) == len(set(names))
    ids = [i for i, _ in CHART_DIV.findall(html)]
    assert len(ids) == len(set(ids))
    specs = SPEC.findall(html)
    assert len(specs) == len(names)
    for s in specs:
        fig = json.loads(s)
        assert fig["data"] and "layout" in fig


def test_metric_names_and_sections(html, table):
    for name in table.columns:
        assert name in html
    for key in ("summary", "heatmap", "depth", "ranking", "heads", "massive_activations", "definitions"):
        assert f'data-section="{key}"' in html
    assert 'data-table="massive-activations"' in html
    assert 'data-table="ranking"' in html
    assert 'data-table="definitions"' in html
    # provenance
    p = table.provenance
    assert "tensor (4, 16)" in html and ">64<" in html and p.torch_version in html
    assert "computed on a random subsample of" in html  # lens sample note
    assert "eager attention" in html  # provenance note


def test_no_external_resources(html):
    body = markup(html)
    hits = [body[max(0, m.start() - 40):m.end() + 40] for m in EXTERNAL.finditer(body)]
    assert hits == []
    assert "<link" not in body  # no stylesheets or fonts
    assert not re.search(r"<script[^>]+src=", body)
    assert "@font-face" not in body


def test_section_order_and_toc(html):
    order = [s.key for s in sections()]
    assert order[0] == "summary" and order[-1] == "definitions"
    positions = [html.index(f'data-section="{k}"') for k in order if f'data-section="{k}"' in html]
    assert positions == sorted(positions)
    assert 'href="#sec-heatmap"' in html


def test_heatmap_normalisation_and_raw_hover(table):
    from layerscope.report import heatmap_figure

    fig, empty = heatmap_figure(table)
    hm = fig.data[0]
    labels = list(hm.y)
    assert "hidden_norm (descriptive)" in labels
    row = labels.index("zd_outlier_share")  # direction 'lower': smallest raw value -> 1
    raw = table.values("zd_outlier_share")
    assert hm.z[row][int(np.nanargmin(raw))] == pytest.approx(1.0)
    assert hm.z[row][int(np.nanargmax(raw))] == pytest.approx(0.0)
    assert "angular_distance_n8" in empty  # 3 layers: no 8-block window
    assert all(0.0 <= v <= 1.0 for r in hm.z for v in r if v is not None)
    assert "raw value" in hm.hovertemplate


def test_importance_normalise():
    v = np.array([1.0, 3.0, np.nan, 2.0])
    assert np.allclose(importance_normalise(v, "higher")[[0, 1, 3]], [0, 1, 0.5])
    assert np.allclose(importance_normalise(v, "lower")[[0, 1, 3]], [1, 0, 0.5])
    assert np.isnan(importance_normalise(v, None)[2])
    assert np.allclose(importance_normalise(np.array([2.0, 2.0]), "higher"), [0.5, 0.5])
    assert np.isnan(importance_normalise(np.array([np.nan, np.nan]), "higher")).all()


def test_ranking_table_matches_scoretable(table, html):
    from layerscope.report import ranking_of

    for name in ("block_influence", "zd_outlier_share@mlp", "massive_activations"):
        assert ranking_of(table.columns[name]) == table.ranking(name)


# --------------------------------------------------------------------------- extension point
def test_registered_section_appears(table):
    t = table.model_copy(deep=True)
    t.extras["my_analysis"] = {"verdict": "prune layers 1 & 2", "series": [0.1, 0.4, 0.2]}

    def render(tab: ScoreTable) -> str | None:
        data = tab.extras.get("my_analysis")
        if data is None:
            return None
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=[0, 1, 2], y=data["series"]))
        return f'<p class="my-verdict">{data["verdict"].replace("&", "&amp;")}</p>' + plotly_chart(fig, "my-analysis")

    register_section("my_analysis", "My analysis", render, order=45)
    register_section("never_shown", "Never shown", lambda tab: None)
    try:
        out = render_report(t, title="Custom <title>")
        assert 'data-section="my_analysis"' in out and "My analysis" in out
        assert '<p class="my-verdict">prune layers 1 &amp; 2</p>' in out
        assert "my-analysis" in chart_names(out)
        assert "Never shown" not in out
        assert "Custom &lt;title&gt;" in out  # autoescape
        # order 45: after the ranking (40), before the heads (50)
        assert out.index('data-section="ranking"') < out.index('data-section="my_analysis"') < out.index('data-section="heads"')
        # the section reads extras: without them it is left out
        assert 'data-section="my_analysis"' not in render_report(table)
    finally:
        unregister_section("my_analysis")
        unregister_section("never_shown")
    assert "my_analysis" not in [s.key for s in sections()]


def test_broken_section_does_not_break_report(table):
    def boom(tab):
        raise ValueError("nope")

    register_section("boom", "Boom", boom)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = render_report(table)
        assert "could not be rendered" in out and "heatmap" in chart_names(out)
        assert any("boom" in str(w.message) for w in caught)
    finally:
        unregister_section("boom")


def test_register_section_validates():
    with pytest.raises(ValueError):
        register_section("", "x", lambda t: None)
    with pytest.raises(TypeError):
        register_section("x", "x", "not callable")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- degraded tables
def test_weights_only_table():
    t = scan(tiny_llama(2), None, metrics="weights")
    out = render_report(t)
    names = chart_names(out)
    assert "heatmap" in names and "depth-stable_rank" in names and "rank-heatmap" in names
    assert not any(n.startswith("heads-") for n in names)
    assert 'data-section="heads"' not in out and 'data-section="massive_activations"' not in out
    assert "none (weight-only metrics)" in out
    assert EXTERNAL.search(markup(out)) is None


def test_encoder_without_lens():
    t = scan_tiny(tiny_bert(), metrics="default")
    out = render_report(t)
    assert "logit_lens" in t.provenance.skipped
    assert 'data-table="skipped"' in out and "no causal LM head" in out
    assert not any("logit_lens" in n for n in chart_names(out))
    assert "heads-sink_mass" in chart_names(out)


def test_none_values_and_no_heads():
    prov = Provenance(model_id="<x>", model_family="toy", num_layers=4, layerscope_version="0")
    t = ScoreTable(provenance=prov)
    t.add(ScoreColumn(name="a", metric="a", unit="block", direction="higher", definition="d",
                      values=[1.0, None, 3.0, 2.0]))
    t.add(ScoreColumn(name="b@mlp", metric="b", unit="mlp", direction="lower", definition="d",
                      values=[None, None, None, None]))
    t.add(ScoreColumn(name="c", metric="c", unit="block", direction=None, definition="d", values=[5.0] * 4))
    t.add(ScoreColumn(name="massive_activations", metric="massive_activations", unit="block", direction="higher",
                      definition="d", values=[None, 2.0, 500.0, None],
                      details={"per_layer": [{}, {"value": 1.0, "token_position": 0, "dim": 3, "top_dims": [3],
                                                   "top_values": [1.0]}, {"value": 9.0}, {}]}))
    out = render_report(t)
    assert "&lt;x&gt;" in out and "<x>" not in markup(out)
    names = chart_names(out)
    assert "heatmap" in names and "depth-a" in names and "depth-c" in names and "depth-b" not in names
    assert "b@mlp" in out  # listed as empty under the heatmap and in the definitions
    assert "massive</span>" in out  # 500x median is flagged
    assert not any(n.startswith("heads-") for n in names)
    empty = ScoreTable(provenance=prov)
    out = render_report(empty)
    assert "has no columns" in out and chart_names(out) == []


def test_write_report(table, tmp_path):
    path = write_report(table, tmp_path / "sub" / "report.html")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# --------------------------------------------------------------------------- static figures
def test_save_static_plots(table, tmp_path):
    from layerscope.report.static import save_static_plots

    paths = save_static_plots(table, tmp_path / "figs", dpi=50)
    names = {p.name for p in paths}
    assert {"heatmap.png", "depth.png", "depth_block_influence.png", "heads_sink_mass.png"} <= names
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights_only = scan(tiny_llama(2), None, metrics="weights")
    names = {p.name for p in save_static_plots(weights_only, tmp_path / "w", dpi=50)}
    assert "heatmap.png" in names and not any(n.startswith("heads_") for n in names)
