"""Reporting helpers: markdown tables and BENCHMARKS.md section updates."""

from awqkit.report.table import markdown_table, write_benchmarks_section

__all__ = ["markdown_table", "write_benchmarks_section"]
