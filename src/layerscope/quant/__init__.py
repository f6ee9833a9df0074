"""Layer-wise mixed-precision quantization: backend (HQQ), allocation, export, sweep, sensitivity."""
from __future__ import annotations


def _register_report_section() -> None:
    try:
        from ..report import register_section
    except Exception:  # the report package is optional here
        return

    def render(table):
        from .sweep import render_section

        return render_section(table)

    register_section("quantization", "Mixed-precision quantization", render, order=80)


_register_report_section()
