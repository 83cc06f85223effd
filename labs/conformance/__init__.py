"""Conformance: one check per spec rule (checks), shared by the suites and the framework's tests,
and the seeded-defect catalogue runner (catalogue)."""

from labs.conformance.checks import CHECKS, Check, CheckContext, checks_for

__all__ = ["CHECKS", "Check", "CheckContext", "checks_for"]
