"""The run's progress figures: steady rate and rate by quarter, from a timeline of (seconds, rows durable)."""
import io

import pytest

from pipeline.progress import Progress


def _progress(total, timeline):
    p = Progress(total, stream=io.StringIO())
    p.timeline = list(timeline)
    return p


def test_rate_by_quarter_shows_a_sagging_run():
    # 100 rows: the first half at 10 rows/s, the second at 5 rows/s
    timeline = [(t, 10 * t) for t in range(1, 6)] + [(5 + 2 * k, 50 + 10 * k) for k in range(1, 6)]
    p = _progress(100, timeline)
    assert p.rate_by_quarter() == pytest.approx([10.0, 10.0, 5.0, 5.0])
    assert p.steady_rate() == pytest.approx((90 - 10) / (13 - 1))


def test_rate_by_quarter_with_gaps_and_no_rows():
    assert _progress(0, []).rate_by_quarter() == []
    assert _progress(100, []).rate_by_quarter() == [None] * 4
    # one block of 60 rows at 3 s, the rest at 4 s: the first two quarters end at no point of their own
    p = _progress(100, [(3.0, 60), (4.0, 100)])
    assert p.rate_by_quarter() == [None, None, 20.0, 40.0]
