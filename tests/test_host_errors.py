"""When a container cannot be had, the test errors with a reason, never a traceback."""

from __future__ import annotations

import shlex
import shutil
import sys

import pytest


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_host_that_cannot_be_built_errors_every_isolated_test_with_the_reason(pytester) -> None:
    """The real kernel knob: pytest runs in a user namespace whose limit on nested
    user namespaces is 0, so no container host can be built."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated
        def test_one():
            pass

        @pytest.mark.isolated
        def test_two():
            pass

        def test_plain():
            pass
        """
    )
    pytest_command = shlex.join([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rE"])
    result = pytester.run(
        "unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--mount-proc",
        "sh", "-c", f"echo 0 > /proc/sys/user/max_user_namespaces && exec {pytest_command}",
        timeout=120,
    )
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines([
        "*the container host could not be built: unshare(user): No space left on device (errno 28)",
        "*python -m pytest_isolate doctor*",
    ])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_pdb_with_isolated_tests_warns_that_it_cannot_stop_inside(pytester, run) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated
        def test_passes():
            pass
        """
    )
    result = run("--pdb")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*--pdb/--trace do not stop in isolated tests*"])
