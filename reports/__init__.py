"""Studies, gates, figures and reports of estbench; :func:`default_report` and :func:`run_report` make the HTML report.

The names are imported on first use, so that the command line answers ``--help`` without importing torch."""
__all__ = ["ReportData", "ReportPlan", "default_report", "run_report"]


def __getattr__(name: str):
    if name in __all__:
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
