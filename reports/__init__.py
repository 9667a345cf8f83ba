"""How it is shown: figures and tables, read from parquet alone. Imports neither torch, bench nor methods.

    from reports import render_report
    render_report("results/default")      # -> results/default/report/{fig_*.png,pdf, table_*.tex, summary.md, index.html}
"""

from .results import load_results
from .render import render_report

__all__ = ["load_results", "render_report"]
