"""The report's page as a Jinja2 template (xai_audit/report/page.py, xai_audit/report/templates):
values are escaped, a missing value is an error, the numbers say what they claim, the templates
ship with the package. The rendered page itself is checked in tests/test_report.py
and test_report_findings.py.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import jinja2
import pytest
import tomllib

from xai_audit.report import page as P
from xai_audit.report.scan import Gallery

ROOT = Path(__file__).resolve().parents[1]


def test_ig_steps_line_says_median_and_range_in_order():
    items = "".join(P._adaptive_ig_items({
        "ig_error_est_p50": 0.01, "ig_error_est_p95": 0.2, "ig_converged_mean": 0.9,
        "ig_steps_p5": 4, "ig_steps_p50": 16, "ig_steps_p95": 64,
    }))  # fmt: skip
    assert "IG steps per image: median 16, 5th–95th percentile 4–64." in items
    assert "median 1.0%, 95th percentile 20.0%" in items and "90.0% of rows converged" in items
    assert P._adaptive_ig_items({}) == []  # not an adaptive run: nothing said


def test_values_from_the_data_are_escaped():
    """An id or a class name is text, whatever it contains: the page never runs it."""
    row = {"id": '<img src=x onerror="alert(1)">', "pred_class": 1, "pred_name": "a<b>",
           "pred_prob": 0.5, "label": 2, "target": 1}  # fmt: skip
    g = Gallery("wrong", "t", "w", ("pred_prob",), lambda c: c)
    html = P._macro(
        "card", P.card_data(P.Card("wrong", 1, 0.5, row, {"image": "img/r.png"}), [], g)
    )
    assert "<img src=x" not in html and 'onerror="' not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    assert "a&lt;b&gt; (1)" in html and "✗ wrong" in html


def test_a_missing_value_is_an_error_not_a_blank():
    data = {"calm": True, "items": [], "count": "3", "border_absolute": "45.0%",
            "error_share": "1.0%"}  # no "ig_error"  # fmt: skip
    with pytest.raises(jinja2.UndefinedError, match="ig_error"):
        P._macro("findings", data)
    data["ig_error"] = "10.0%"
    assert "IG error p95 at most 10.0%" in P._macro("findings", data)


def test_the_templates_ship_with_the_package():
    """Every file the page loads is matched by pyproject's package-data, so a wheel (not only an
    editable install) renders the report."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["xai_audit.report"]
    files = sorted(p.relative_to(P.TEMPLATES.parent).as_posix() for p in P.TEMPLATES.iterdir())
    assert {"templates/report.html.j2", "templates/macros.html.j2", "templates/report.css"} <= set(
        files
    )
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)
