"""The shape of the code: stage packages whose imports flow one way (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A package may import only the packages ranked below it (and itself): data flows ingest -> store ->
# learning -> export -> registry -> distribution, and each stage calls the typed API of those it hands
# work to or reads from. The service composes the stages; tools (demo, test broker, feeder) and the
# command line sit on top, and nothing of the service imports them.
RANKS = {
    "common": 0,
    "store": 1,
    "ingest": 2,
    "learning": 2,
    "registry": 2,
    "export": 3,
    "distribution": 3,
    "service": 4,
    "tools": 5,
    "cli": 6,  # daemon/cli/: the command line
}


def daemon_imports(path: Path) -> set[str]:
    """The daemon packages a module imports, at any depth in the module (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "daemon":
            names = [node.module] if node.module != "daemon" else [f"daemon.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "daemon"]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.count(".") >= 1 and name.split(".")[1] != "__version__"}
    return found


def package_of(path: Path) -> str:
    parts = path.relative_to(REPO / "daemon").parts
    return parts[0] if len(parts) > 1 else path.stem


def test_every_daemon_module_lives_in_a_stage_package_and_imports_only_downward():
    upward = []
    for path in sorted((REPO / "daemon").rglob("*.py")):
        if path.parent == REPO / "daemon" and path.name == "__init__.py":
            continue
        package = package_of(path)
        assert package in RANKS, f"{path.relative_to(REPO)}: not in a stage package ({', '.join(RANKS)})"
        for imported in daemon_imports(path) - {package}:
            assert imported in RANKS, f"{path.relative_to(REPO)} imports daemon.{imported}, which is no package"
            if RANKS[imported] >= RANKS[package]:
                upward.append(f"{path.relative_to(REPO)} ({package}) imports daemon.{imported}")
    assert upward == [], "imports against the flow:\n" + "\n".join(upward)


def test_the_check_itself_sees_an_upward_import(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from daemon.service.daemon import Daemon\nfrom daemon import logs\n")
    assert daemon_imports(module) == {"service", "logs"}


def imported_test_modules(path: Path) -> set[str]:
    """The test modules (``test_*``) that ``path`` imports, at any depth, relative imports and the scripts it hands
    a child Python in a string (``"from test_x import y"``) included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom):
            names = [node.module] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = re.findall(r"^\s*(?:from|import)\s+(test_\w+)", node.value, re.M)
        else:
            continue
        found |= {name.split(".")[0] for name in names if name.split(".")[0].startswith("test_")}
    return found


def test_no_test_module_imports_another():
    """What test modules share lives in helper modules (tests/helpers.py, learning_helpers.py, ...) and in
    conftest.py's fixtures: importing a test module runs its import-time work, shares its module-scoped state and
    puts its fixtures in a second module, where pytest runs them again."""
    tests = REPO / "tests"
    offenders = [
        f"{path.relative_to(REPO)} imports {', '.join(sorted(imported))}"
        for path in sorted(tests.rglob("*.py"))
        if (imported := imported_test_modules(path))
    ]
    assert offenders == [], "move what they share into a helper module or a conftest.py fixture:\n" + "\n".join(
        offenders
    )


def test_the_check_itself_sees_a_test_module_imported(tmp_path: Path):
    module = tmp_path / "test_m.py"
    source = (
        "from helpers import wait_for\n"
        "def test_f():\n    from TEST_learner import stream\n"
        "from .TEST_chaos import x\n"
        "SCRIPT = 'import os\\nimport TEST_decoding as d\\n'\n"
    )
    module.write_text(source.replace("TEST_", "test_"))  # spelled apart: this file must pass the check itself
    assert imported_test_modules(module) == {"test_learner", "test_chaos", "test_decoding"}


def test_models_import_nothing_of_the_service():
    for path in sorted((REPO / "models").rglob("*.py")):
        assert daemon_imports(path) == set(), f"{path.relative_to(REPO)} imports the daemon"


def test_under_ci_a_skip_that_set_up_should_have_prevented_fails_the_run(tmp_path: Path):
    import os
    import subprocess
    import sys

    (tmp_path / "test_skips.py").write_text(
        "import pytest\n"
        "def test_gpu():\n    pytest.skip('CUDA graphs need a CUDA device')\n"
        "def test_tool():\n    pytest.skip('chromium is not installed')\n"
    )

    def run(*args: str, ci: bool) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
        env["PYTHONPATH"] = str(REPO / "tests")
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "skip_gate", "-p", "no:cacheprovider", *args, str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )

    failed = run(ci=True)
    assert failed.returncode == 1 and "test_skips.py::test_tool: chromium is not installed" in failed.stdout
    assert "test_gpu" not in failed.stdout.split("set-up should have removed")[1]
    assert run(ci=False).returncode == 0  # outside CI it only says so
    assert run("-k", "gpu", ci=True).returncode == 0  # a machine's own limits are expected
