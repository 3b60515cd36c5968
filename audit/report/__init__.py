"""The report: an audit of the last day as figures, a comparison with the previous report,
trends, the CI gate, and self-contained HTML, Markdown and JSON (docs/report.md)."""
