"""The Jinja2 templates of the report and the inlined plotly.js bundle."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from layerscope.report.charts import fmt
from layerscope.report.figures import UNIT_LABEL, direction_short, direction_text

TEMPLATES_DIR = Path(__file__).with_name("templates")


@lru_cache(maxsize=1)
def environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["direction_text"] = direction_text
    env.filters["direction_short"] = direction_short
    env.globals["UNIT_LABEL"] = UNIT_LABEL
    return env


def render_template(template: str, **ctx: Any) -> str:
    return environment().get_template(template).render(**ctx)


@lru_cache(maxsize=1)
def plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    # Never let the bundle end the script element early.
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.I)
