"""Host kernel health as a verdict: which kernel log lines and taint changes fail a test.

Pure functions over kernel log lines (dmesg's "[ sec.usec] text" form, as the host agent's
`kmsg` op gives them) and /proc/sys/kernel/tainted values, plus a small per-host watch that
reads them through any `KmsgSource` (the agent on a real host, a fake in unit tests).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# (kind, pattern on the text after the timestamp); the first match names a line, so the
# specific reports (KASAN, soft lockup, general protection fault) come before BUG and Oops
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("Kernel panic", r"Kernel panic - not syncing"),
        ("KASAN", r"BUG: KASAN: "),
        ("KFENCE", r"BUG: KFENCE: "),
        ("UBSAN", r"UBSAN: "),
        ("soft lockup", r"(watchdog: )?BUG: soft lockup"),
        ("hard lockup", r"(NMI )?watchdog: Watchdog detected hard LOCKUP"),
        ("RCU stall", r"(rcu: )?INFO: rcu_\w+ (detected stalls|self-detected stall)"),
        ("hung task", r"INFO: task \S+ blocked for more than \d+ seconds"),
        ("general protection fault", r"(Oops: )?general protection fault"),
        ("BUG", r"(kernel BUG at |BUG: )"),
        ("Oops", r"(Internal error: )?Oops\b|Unable to handle kernel "),
        ("WARNING", r"WARNING: "),
    )
)

# /proc/sys/kernel/tainted bit -> letter and meaning (Documentation/admin-guide/tainted-kernels.rst)
TAINT_FLAGS: tuple[tuple[str, str], ...] = (
    ("P", "proprietary module loaded"),
    ("F", "module force loaded"),
    ("S", "kernel running on an out of specification system"),
    ("R", "module force unloaded"),
    ("M", "processor reported a Machine Check Exception"),
    ("B", "bad page referenced or unexpected page flags"),
    ("U", "taint requested by userspace"),
    ("D", "kernel died recently (OOPS or BUG)"),
    ("A", "ACPI table overridden by user"),
    ("W", "kernel issued warning"),
    ("C", "staging driver loaded"),
    ("I", "workaround for platform firmware bug applied"),
    ("O", "externally-built (out-of-tree) module loaded"),
    ("E", "unsigned module loaded"),
    ("L", "soft lockup occurred"),
    ("K", "kernel live patched"),
    ("X", "auxiliary taint"),
    ("T", "kernel built with the struct randomization plugin"),
    ("N", "in-kernel test loaded"),
    ("J", "userspace used a mutating debug operation in fwctl"),
)

_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s?")


class HostKernelError(AssertionError):
    """A host kernel reported trouble during a test: a finding, never an infrastructure error."""


def text_of(line: str) -> str:
    """The message of a dmesg line, without its timestamp."""
    return _TIMESTAMP.sub("", line, count=1)


def classify(line: str) -> str | None:
    """The kind of kernel trouble a log line reports (e.g. "WARNING", "RCU stall"), or None."""
    text = text_of(line)
    for kind, pattern in KINDS:
        if pattern.match(text):
            return kind
    return None


def compile_allow(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p) for p in patterns)


def allowed(line: str, allow: Sequence[re.Pattern[str]]) -> bool:
    text = text_of(line)
    return any(p.search(text) for p in allow)


@dataclass(frozen=True)
class Finding:
    kind: str
    line: str


def findings(lines: Iterable[str], allow: Sequence[re.Pattern[str]] = ()) -> list[Finding]:
    """The lines that report kernel trouble, less those an allowlist pattern matches."""
    out = []
    for line in lines:
        kind = classify(line)
        if kind is not None and not allowed(line, allow):
            out.append(Finding(kind, line))
    return out


def taint_letters(mask: int) -> str:
    """The taint flags of a /proc/sys/kernel/tainted value by letter, e.g. 4608 -> "OE"."""
    return "".join(letter for bit, (letter, _) in enumerate(TAINT_FLAGS) if mask >> bit & 1)


def new_taint(before: int | None, after: int | None) -> str:
    """The taint flags set in `after` but not in `before` ("" when either is unknown)."""
    if before is None or after is None:
        return ""
    return taint_letters(after & ~before)


def describe_taint(letters: str) -> str:
    meaning = dict(TAINT_FLAGS)
    return ", ".join(f"{c} ({meaning[c]})" for c in letters)


@dataclass
class HostCheck:
    """What one host's kernel said between two reads."""

    host: str
    lines: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    new_taint: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.findings or self.new_taint)

    def summary(self) -> str:
        """One line: the first finding (and how many more), the new taint flags."""
        parts = []
        if self.findings:
            first = text_of(self.findings[0].line)
            more = len(self.findings) - 1
            parts.append(f"{first[:160]}{f' (+{more} more)' if more else ''}")
        if self.new_taint:
            parts.append(f"taint +{self.new_taint}")
        return f"{self.host}: {'; '.join(parts)}"

    def evidence(self) -> str:
        """The matching lines and the taint change, for the report."""
        out = [f"{f.line}  ({f.kind})" for f in self.findings]
        if self.new_taint:
            out.append(f"taint changed: +{self.new_taint}: {describe_taint(self.new_taint)}")
        return "\n".join(out) + "\n"


def reason(checks: Iterable[HostCheck]) -> str:
    """The one-line reason a test failed on its hosts' kernels."""
    return "host kernel: " + " | ".join(c.summary() for c in checks if c.failed)


KmsgSource = Callable[[int], Mapping[str, Any]]
"""Reads a host's kernel log: after=-1 gives only the cursor. Returns the agent's `kmsg`
answer: seq (the newest record's number, None when unreadable), lines, tainted (an int or
None), and error (why the log cannot be read)."""


class KernelWatch:
    """One host's kernel log and taint since the watch began; each check() covers what came since
    the previous one, so a test's call and its teardown are judged apart."""

    def __init__(self, host: str, source: KmsgSource, allow: Sequence[re.Pattern[str]] = ()) -> None:
        self.host, self.source, self.allow = host, source, allow
        first = source(-1)
        self.seq: int | None = first.get("seq")
        self.taint: int | None = first.get("tainted")
        self.error: str | None = first.get("error")

    def check(self) -> HostCheck:
        lines: list[str] = []
        taint = None
        if self.seq is not None or self.taint is not None:
            got = self.source(self.seq if self.seq is not None else -1)
            if self.seq is not None:
                lines = [str(x) for x in got.get("lines", [])]
                self.seq = got.get("seq", self.seq)
            taint = got.get("tainted")
        check = HostCheck(self.host, lines, findings(lines, self.allow), new_taint(self.taint, taint))
        if taint is not None:
            self.taint = taint
        return check
