"""Studies, gates, figures and reports of estbench; :func:`default_report` and :func:`run_report` make the HTML report."""
from .report import ReportData, ReportPlan, default_report, run_report

__all__ = ["ReportData", "ReportPlan", "default_report", "run_report"]
