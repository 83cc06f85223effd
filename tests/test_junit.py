"""The one JUnit reader: the nested stage's failure lines and the defect catalogue's outcomes both come from it."""

from __future__ import annotations

from pathlib import Path

from labs.junit import cases


def test_a_failure_and_its_teardown_error_are_both_kept_failure_first(tmp_path: Path) -> None:
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="m" name="t[x]">'
        '<properties><property name="device" value="hostA:d"/><property name="device" value="hostA:d"/></properties>'
        '<error message="teardown: VM left">tb1</error><failure message="">E assert 1 == 2\nmore</failure>'
        '</testcase><testcase classname="m" name="s"><skipped message="no device"/></testcase></testsuite></testsuites>'
    )
    failed, skipped = cases(junit)
    assert (failed.nodeid, failed.values("device"), failed.skipped) == ("m::t[x]", ["hostA:d"], False)
    assert [(p.kind, p.first_line) for p in failed.problems] == [
        ("failure", "E assert 1 == 2"),  # no message: the text's first line
        ("error", "teardown: VM left"),
    ]
    assert (skipped.nodeid, skipped.skipped, skipped.problems) == ("m::s", True, ())
