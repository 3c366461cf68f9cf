"""Messages that say what to do: typos of the marker and its keywords, and advice
that is not repeated to a user who followed it already."""

from __future__ import annotations

import os

import pytest

from pytest_isolate.limits import Limiter
from pytest_isolate.options import Settings


def test_a_typo_of_the_marker_is_an_error_that_names_the_marker(pytester, run) -> None:
    """``@pytest.mark.isolate`` would run the test unisolated, with only pytest's
    generic unknown-mark warning: that is a usage error here."""
    pytester.makepyfile(test_typo="""
        import pytest

        @pytest.mark.isolate
        def test_a():
            pass
    """)
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: test_typo.py::test_a: @pytest.mark.isolate is not a marker of "
                                 "pytest-isolate (did you mean 'isolated'?)"])
    assert "1 passed" not in result.stdout.str()


def test_a_marker_registered_by_the_project_is_its_own(pytester, run) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    isolate: the project's own marker\n")
    pytester.makepyfile(test_own="""
        import pytest

        @pytest.mark.isolate
        def test_a():
            pass
    """)
    result = run()
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1)


def test_an_unknown_keyword_gets_a_did_you_mean(pytester, run) -> None:
    pytester.makepyfile(test_kw="""
        import pytest

        @pytest.mark.isolated(tmeout=3)
        def test_a():
            pass
    """)
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: test_kw.py::test_a: @pytest.mark.isolated got an unknown keyword "
                                 "'tmeout' (did you mean 'timeout'?); accepted: mode, image, timeout, *"])


def test_one_test_collected_is_one_test(pytester, run) -> None:
    pytester.makepyfile(test_one="def test_a():\n    pass\n")
    result = run("--isolate")
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines([r"container host \((fork|fresh) mode, image host\): started in [\d.]+s, "
                                  r"(1 test|0 tests) collected.*"])


@pytest.mark.parametrize("reason", [
    "cgroup v1: unprivileged users cannot be given cgroups safely (v1 has no delegation), so limits cannot be "
    "enforced rootless here. Run pytest as root or on a cgroup-v2 host, or pass --isolate-limits=best-effort "
    "(rlimits instead)",
    "cgroup v2: no delegated subtree (systemd's user@UID.service) holds this process, so limits cannot be "
    "enforced rootless. Run inside a user session of systemd, or pass --isolate-limits=best-effort "
    "(rlimits instead)",
])
def test_best_effort_does_not_advise_best_effort(reason: str) -> None:
    limiter = Limiter()
    limiter._backend_error = reason
    plan = limiter.plan(Settings(memory=64 << 20, limits="best-effort"), host=None)
    assert plan.error is None
    assert plan.enforcement.startswith("best-effort, no cgroup (cgroup v")
    assert "--isolate-limits" not in plan.enforcement
    assert "RLIMIT_DATA" in plan.enforcement


def test_a_write_to_the_read_only_host_says_where_to_write(pytester, run) -> None:
    pytester.makepyfile(test_write="""
        def test_writes_into_the_project(request):
            open(str(request.config.rootpath / "out.txt"), "w")
    """)
    result = run("--isolate")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Read-only file system*", "*- pytest-isolate hint -*",
                                 "The host's directories are read-only in the container * write to tmp_path, or "
                                 'mount a writable directory: @pytest.mark.isolated(mounts=[[]"SRC:DST:rw"[]]).'])


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: rootless, container root is the user")
def test_a_rw_mount_container_root_cannot_write_names_the_uid(pytester, run) -> None:
    from pytest_isolate.runtime import user_ns

    uid = user_ns.host_uid_of_container_root()
    source = pytester.mkdir("outbox")
    source.chmod(0o755)  # root's: not container root's
    pytester.makepyfile(test_rw=f"""
        import pytest

        @pytest.mark.isolated(mounts=["{source}:/outbox:rw"])
        def test_writes():
            open("/outbox/result.txt", "w")
    """)
    result = run("--isolate")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*PermissionError*", "*- pytest-isolate hint -*",
        f"Container root is host uid {uid} *: a :rw mount source must be writable by that uid, e.g. chown {uid} SRC*",
        f"  note: the :rw mount source {source} is not writable by container root (host uid {uid}): *",
    ])
    assert not (source / "result.txt").exists()
