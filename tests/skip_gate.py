"""A pytest plugin: under CI (the CI variable set), a test skipped for a reason set-up should have removed
fails the run. Skips that say something about the machine, not about the set-up, are expected: CI's
machines have no GPU, and a kernel or a sandbox may lack a feature. Any other skip means `make test`'s
set-up left a tool out, and the test it guards did not run."""

from __future__ import annotations

import os

import pytest

EXPECTED_SKIPS = ("CUDA graphs need a CUDA device", "this kernel has no PR_SET_MDWE", "cannot mount a tmpfs")
_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        if not reason.startswith(EXPECTED_SKIPS):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and os.environ.get("CI") and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:
    if _unexpected_skips:
        verdict = "fail the run under CI" if os.environ.get("CI") else "would fail the run under CI"
        terminalreporter.write_line(
            f"{len(_unexpected_skips)} tests skipped for a reason set-up should have removed ({verdict}; "
            "scripts/test-tools.sh installs the tools):",
            red=True,
        )
        for line in _unexpected_skips:
            terminalreporter.write_line(f"  {line}", red=True)
