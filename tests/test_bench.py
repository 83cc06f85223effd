"""`lab bench`'s table: one row per headline figure, from whatever steps ran."""

from __future__ import annotations

from labs.bench import headline


def test_headline_rows_from_each_step() -> None:
    results = {
        "suite": {"date": "2026-11-26T00:00:00Z", "serial": {"wall_s": 101.2, "pytest_exit": 0},
                  "xdist_2": {"wall_s": 60.4, "pytest_exit": 0}},
        "scaling": {"1": {"wall_s": 30.0, "pytest_exit": 0, "vs_one_pair": 1.0}},
        "memory": {"tests": 1000, "rss_mb": [{"tests": 100, "rss_mb": 80.0}, {"tests": 1000, "rss_mb": 81.5}],
                   "growth_after_warmup_mb": 0.4},
    }  # fmt: skip
    rows = dict(headline(results))
    assert rows["all suites on the sim lab, xdist 2"] == "60 s (exit 0)"
    assert rows["conformance over 1 sim pair(s), 1 worker(s)"] == "30 s (1.0x one pair)"
    assert rows["controller RSS over 1000 tests"] == "80.0 MB at test 100, 81.5 MB at test 1000, +0.4 MB"
    assert headline({"date": "x"}) == []
