"""Moved to ``jobs.report.visualizations``; this name stays for code that imports it."""

from jobs.report.visualizations import (  # noqa: F401
    MAX_FILES,
    REAL_PER_CLASS,
    read_class_images,
    real_rows,
    visualization_data,
    visualization_section,
)
