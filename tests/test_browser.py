"""The HTML report in a real browser (Debian's chromium through Playwright): it renders every chart,
logs no errors and requests nothing but its own file."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

from layerscope.report import render_report
from layerscope.metrics.scan import scan

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path("/tmp/report.png")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright python package missing"),
]

CHART_DIV = re.compile(r'<div class="ls-chart" id="[^"]+" data-chart="[^"]+"')
# Charts whose div became a plotly graph with its SVG drawn.
COUNT_RENDERED = """() => Array.from(document.querySelectorAll('div.ls-chart'))
    .filter(d => d.classList.contains('js-plotly-plot') && d.querySelector('svg.main-svg')).length"""


def tiny_llama_table(metrics="all", data=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1)) if data else None
    return scan(model, ids, metrics=metrics, tokens=64, seq_len=16, batch_size=2, lens_tokens=32)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            yield b
        finally:
            b.close()


def open_report(browser, html: str, path: Path, screenshot: Path | None = None) -> dict:
    path.write_text(html, encoding="utf-8")
    url = path.resolve().as_uri()
    blocked: list[str] = []
    requested: list[str] = []
    console_errors: list[str] = []
    page_errors: list[str] = []

    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    page = context.new_page()

    def gate(route):
        if route.request.url == url:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", gate)
    page.on("request", lambda r: requested.append(r.url))
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    try:
        page.goto(url, wait_until="load")
        n_containers = page.locator("div.ls-chart").count()
        page.wait_for_function(f"() => ({COUNT_RENDERED})() === {n_containers}", timeout=60_000)
        page.wait_for_timeout(300)  # let late console messages arrive
        result = dict(
            url=url,
            containers=n_containers,
            rendered=page.evaluate(COUNT_RENDERED),
            failed=page.locator(".ls-chart-failed").count(),
            leftover_specs=page.locator("script.ls-chart-spec").count(),
            plotly=page.evaluate("() => typeof Plotly === 'object' && typeof Plotly.newPlot === 'function'"),
            chart_names=page.eval_on_selector_all("div.ls-chart", "els => els.map(e => e.dataset.chart)"),
            heights=page.eval_on_selector_all("div.ls-chart", "els => els.map(e => e.getBoundingClientRect().height)"),
        )
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
    finally:
        context.close()
    # data:/blob: URLs are in-memory (plotly may draw heatmaps through them), never the network.
    network = [u for u in requested if u != url and not u.startswith(("data:", "blob:"))]
    result.update(blocked=blocked, other_requests=network, console_errors=console_errors, page_errors=page_errors)
    return result


def check(result: dict, html: str) -> None:
    assert result["blocked"] == [], f"the report tried to load {result['blocked']}"
    assert result["other_requests"] == [], f"the report requested {result['other_requests']}"
    assert result["page_errors"] == []
    assert result["console_errors"] == []
    assert result["plotly"]
    assert result["containers"] == len(CHART_DIV.findall(html)) > 0
    assert result["rendered"] == result["containers"]
    assert result["failed"] == 0 and result["leftover_specs"] == 0
    assert all(h >= 150 for h in result["heights"]), result["heights"]


def test_full_report_in_chromium(browser, tmp_path):
    table = tiny_llama_table()
    html = render_report(table)
    result = open_report(browser, html, tmp_path / "report.html", screenshot=SCREENSHOT)
    check(result, html)
    names = result["chart_names"]
    assert "heatmap" in names and "rank-heatmap" in names
    assert {"heads-attention_entropy", "heads-sink_mass", "heads-head_output_norm", "heads-dormant_head"} <= set(names)
    assert any(n.startswith("depth-") for n in names)
    assert SCREENSHOT.exists() and SCREENSHOT.stat().st_size > 10_000


def test_weights_only_report_in_chromium(browser, tmp_path):
    table = tiny_llama_table(metrics="weights", data=False)
    html = render_report(table)
    result = open_report(browser, html, tmp_path / "weights.html")
    check(result, html)
    assert not any(n.startswith("heads-") for n in result["chart_names"])
