"""The rootless lane: the whole suite again, as an unprivileged user (made for the run
and removed after it, unless it was there already: see conftest.system_user).

CI runs as root; containers then map root to an unprivileged uid range. Rootless
containers (the user's own uid as container root) take other code paths, so the same
tests run again as ``pytest-isolate-ci`` with Debian's /usr/bin/python3 (pyenv's
interpreter under /root is out of reach of other users), from a copy of the project
in a world-readable temporary directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import IS_ROOT, system_user

USER = "pytest-isolate-ci"
SYSTEM_PYTHON = "/usr/bin/python3"
PROJECT = Path(__file__).resolve().parent.parent
COPIED = ("pytest_isolate", "tests", "docs", "pyproject.toml", "README.md")

pytestmark = [
    pytest.mark.rootless_lane,
    pytest.mark.skipif(not IS_ROOT, reason="creates a user: needs root (this is the lane itself)"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"needs {SYSTEM_PYTHON}"),
    pytest.mark.skipif(os.environ.get("PYTEST_ISOLATE_NO_ROOTLESS_LANE") == "1",
                       reason="PYTEST_ISOLATE_NO_ROOTLESS_LANE=1"),
]


def as_user(*command: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return subprocess.run(["runuser", "-u", USER, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                           *command], cwd=cwd, timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def rootless_project():
    with system_user(USER) as user:
        yield from _copy_and_install(user)


def _copy_and_install(user: pwd.struct_passwd):
    work = Path(tempfile.mkdtemp(prefix="pytest-isolate-rootless-"))
    try:
        os.chmod(work, 0o755)
        for name in COPIED:
            source = PROJECT / name
            if source.is_dir():
                shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif source.exists():
                shutil.copy2(source, work / name)
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(work)], check=True)
        venv = as_user(SYSTEM_PYTHON, "-m", "venv", str(work / "venv"), cwd=work, timeout=300)
        assert venv.returncode == 0, venv.stdout
        install = as_user(str(work / "venv/bin/python"), "-m", "pip", "install", "-q", "-e", ".[test]",
                          cwd=work, timeout=900)
        assert install.returncode == 0, install.stdout
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_suite_passes_rootless(rootless_project: Path) -> None:
    result = as_user(str(rootless_project / "venv/bin/python"), "-m", "pytest", "tests", "-p", "no:cacheprovider",
                     "-q", "-rA", "-m", "not rootless_lane", cwd=rootless_project, timeout=2400)
    print(result.stdout)  # shown when this test fails
    assert result.returncode == 0, result.stdout[-5000:]
    last = result.stdout.strip().splitlines()[-1]
    assert " passed" in last and " failed" not in last and " error" not in last, last
    # It really ran rootless: the rootless-only mapping test ran and passed.
    assert "PASSED tests/test_isolation.py::test_rootless_container_root_is_the_user" in result.stdout
