"""How it is shown: figures and tables, read from parquet alone. Imports neither torch, bench nor methods.

    from reports import render_report
    render_report("results/default")      # -> results/default/report/{fig_*.png,pdf, table_*.tex, summary.md, index.html}

``reports.results`` is the result format itself; bench/ imports it to write rows. Importing it does not import
the rendering modules (matplotlib): they load on first use of ``render_report``.
"""

from .results import load_results

__all__ = ["load_results", "render_report"]


def __getattr__(name: str):
    if name == "render_report":
        from .render import render_report

        return render_report
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
