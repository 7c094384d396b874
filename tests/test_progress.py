"""The progress line while nothing is written yet (issue 22, item 7): under --ig-steps auto a
batch takes minutes and a part holds many batches, so the line says what the actors are doing
(rows in flight, rows computed) and its rate and ETA count computed rows."""

from __future__ import annotations

import time

from xai_audit.progress import Progress, ProgressCounter


def test_the_line_says_what_a_long_first_batch_is_doing():
    lines: list[str] = []
    p = Progress(18, 0, lines.append, interval=0, busy="adaptive IG: a batch can take minutes")
    p.start()
    p.update(0, 0, 0, 0, computed=0, in_flight=16, force=True)
    assert lines[-1].startswith("0/18 rows (0%)")
    assert "first batch, 16 rows in flight (adaptive IG: a batch can take minutes)" in lines[-1]
    time.sleep(0.05)
    p.update(0, 0, 0, 0, computed=16, in_flight=2, force=True)
    assert "16 computed, 2 rows in flight" in lines[-1], lines[-1]
    assert "| 0.0 rows/s" not in lines[-1] and "ETA ?" not in lines[-1], lines[-1]
    p.update(18, 0, 1, 1000, computed=18, in_flight=0, force=True)
    assert lines[-1].startswith("18/18 rows (100%)") and "computed" not in lines[-1], lines[-1]


def test_a_run_without_actor_reports_reads_as_before():
    lines: list[str] = []
    p = Progress(10, 0, lines.append, interval=0)
    p.update(4, 1, 2, 100, force=True)  # write tasks only (as `xai-audit visualize` reports)
    assert lines[-1].startswith("4/10 rows (40%)") and lines[-1].endswith("1 errors | 2 files")


def test_the_counter_keeps_rows_in_flight_and_computed():
    c = ProgressCounter()
    c.batch_started(16)
    c.batch_started(2)
    assert c.get() == [0, 0, 0, 0, 0, 18]
    c.batch_done(16)
    c.add(16, 1, 2048)
    assert c.get() == [16, 1, 1, 2048, 16, 2]
