"""Fixture scopes across the controller and the containers, from a real inner run.

Every fixture of the inner run writes "FIX <setup|teardown> <name> <where>" to fd 2
(and each test "FIX test <name> <where>"); with -s, what isolated tests write reaches
the inner pytest's stderr as well, so its stderr is one ordered log of both sides.
"<where>" is "container" for pid 2 under the hostname "isolated", else "controller".
"""

from __future__ import annotations

import pytest

from conftest import read_junit, section

LOGGING_CONFTEST = '''
import os, socket
import pytest

def where():
    inside = os.getpid() == 2 and socket.gethostname() == "isolated"
    return "container" if inside else "controller"

def log(*words):
    os.write(2, ("FIX " + " ".join(words + (where(),)) + "\\n").encode())

def logged(name, scope, fail_teardown_in_controller=False):
    def fixture():
        log("setup", name)
        yield name
        log("teardown", name)
        if fail_teardown_in_controller and where() == "controller":
            raise RuntimeError(f"{name} teardown boom")
    return pytest.fixture(scope=scope, name=name)(fixture)

sess = logged("sess", "session")
mod = logged("mod", "module")
cls = logged("cls", "class")
bad_mod = logged("bad_mod", "module", fail_teardown_in_controller=True)
'''


def fixture_log(result: pytest.RunResult) -> list[str]:
    return [line[len("FIX "):] for line in result.errlines if line.startswith("FIX ")]


def in_container(test: str, *fixtures: str) -> list[str]:
    """What an isolated test logs: its own set-up and tear-down of every fixture it uses."""
    return ([f"setup {f} container" for f in fixtures] + [f"test {test} container"]
            + [f"teardown {f} container" for f in reversed(fixtures)])


def test_function_fixture_runs_in_the_tests_own_container(pytester, run) -> None:
    """A function-scoped fixture shares the test's process, hostname and root filesystem;
    what it writes is gone for the next test and was never on the host. tmp_path works
    there although pytester points PYTEST_DEBUG_TEMPROOT at a host directory."""
    pytester.makepyfile('''
        import os, socket
        import pytest

        @pytest.fixture
        def made_file():
            with open("/made-by-fixture", "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}")
            yield "/made-by-fixture"
            assert os.path.exists("/made-by-fixture")

        @pytest.mark.isolated
        def test_1_sees_the_fixtures_file(made_file, tmp_path):
            with open(made_file) as f:
                assert f.read() == "isolated 2"
            assert os.getpid() == 2
            (tmp_path / "x").write_text("ok")

        @pytest.mark.isolated(hostname="box")
        def test_2_fixture_sees_this_tests_hostname(made_file):
            with open(made_file) as f:
                assert f.read() == "box 2"

        @pytest.mark.isolated
        def test_3_file_is_gone():
            assert not os.path.exists("/made-by-fixture")

        def test_4_never_on_the_host():
            assert not os.path.exists("/made-by-fixture")
            assert socket.gethostname() != "isolated" and os.getpid() != 2
    ''')
    run("-v").assert_outcomes(passed=4)


@pytest.mark.parametrize("mode", ["fork", "fresh"])
def test_shared_fixtures_of_mixed_plain_and_isolated_tests(pytester, run, mode) -> None:
    """Session and module fixtures: once in the controller for the plain tests (set up
    lazily, torn down at the end), and once per isolated test inside its container."""
    pytester.makeconftest(LOGGING_CONFTEST)
    pytester.makepyfile(test_a_mixed='''
        import pytest
        from conftest import log

        def test_p1(sess, mod): log("test", "p1")

        @pytest.mark.isolated
        def test_i1(sess, mod): log("test", "i1")

        def test_p2(sess, mod): log("test", "p2")

        @pytest.mark.isolated
        def test_i2(sess, mod): log("test", "i2")

        def test_p3(sess, mod): log("test", "p3")
    ''', test_b_plain='''
        from conftest import log

        def test_b(sess): log("test", "b")
    ''')
    result = run("-s", f"--isolate-mode={mode}")
    result.assert_outcomes(passed=6)
    assert fixture_log(result) == [
        "setup sess controller", "setup mod controller", "test p1 controller",
        *in_container("i1", "sess", "mod"),
        "test p2 controller",
        *in_container("i2", "sess", "mod"),
        "test p3 controller", "teardown mod controller",
        "test b controller", "teardown sess controller",
    ]


def test_isolated_tests_first_leave_nothing_set_up_in_the_controller(pytester, run) -> None:
    """Isolated tests before any plain one: the controller sets up nothing for them,
    and sets up the session fixture only when the first plain test needs it."""
    pytester.makeconftest(LOGGING_CONFTEST)
    pytester.makepyfile('''
        import pytest
        from conftest import log

        @pytest.mark.isolated
        def test_i1(sess): log("test", "i1")

        @pytest.mark.isolated
        def test_i2(sess, mod): log("test", "i2")

        def test_p1(sess): log("test", "p1")
    ''')
    result = run("-s")
    result.assert_outcomes(passed=3)
    assert fixture_log(result) == [
        *in_container("i1", "sess"), *in_container("i2", "sess", "mod"),
        "setup sess controller", "test p1 controller", "teardown sess controller",
    ]


def test_class_fixture_whose_last_user_is_isolated(pytester, run) -> None:
    """A class fixture: once in the controller for the plain methods, torn down there
    after the class's last (isolated) method and before the next test outside it."""
    pytester.makeconftest(LOGGING_CONFTEST)
    pytester.makepyfile('''
        import pytest
        from conftest import log

        class TestGroup:
            def test_p1(self, cls): log("test", "p1")

            @pytest.mark.isolated
            def test_i1(self, cls): log("test", "i1")

            def test_p2(self, cls): log("test", "p2")

            @pytest.mark.isolated
            def test_i2(self, cls): log("test", "i2")

        def test_after(): log("test", "after")
    ''')
    result = run("-s")
    result.assert_outcomes(passed=5)
    assert fixture_log(result) == [
        "setup cls controller", "test p1 controller",
        *in_container("i1", "cls"),
        "test p2 controller",
        *in_container("i2", "cls"),
        "teardown cls controller", "test after controller",
    ]


def test_module_fixture_whose_last_user_is_isolated(pytester, run) -> None:
    """The controller tears a module fixture down after the module's last (isolated)
    test, before the plain test of the next module runs."""
    pytester.makeconftest(LOGGING_CONFTEST)
    pytester.makepyfile(test_a='''
        import pytest
        from conftest import log

        def test_p(mod): log("test", "a_p")

        @pytest.mark.isolated
        def test_i(mod): log("test", "a_i")
    ''', test_b='''
        from conftest import log

        def test_p(mod): log("test", "b_p")
    ''')
    result = run("-s")
    result.assert_outcomes(passed=3)
    assert fixture_log(result) == [
        "setup mod controller", "test a_p controller",
        *in_container("a_i", "mod"),
        "teardown mod controller",
        "setup mod controller", "test b_p controller", "teardown mod controller",
    ]


CONTROLLER_TEARDOWN_ERROR = {
    "test_a": '''
        import pytest
        from conftest import log

        def test_p(bad_mod): log("test", "a_p")

        @pytest.mark.isolated
        def test_i(bad_mod): log("test", "a_i")
    ''',
    "test_b": '''
        from conftest import log

        def test_after(): log("test", "b_after")
    ''',
}


def test_controller_teardown_error_is_reported_on_the_isolated_test(pytester, run) -> None:
    """A module fixture failing its controller-side teardown after an isolated test:
    ERROR at teardown of that test (as in a plain run), and the run goes on."""
    pytester.makeconftest(LOGGING_CONFTEST)
    pytester.makepyfile(**CONTROLLER_TEARDOWN_ERROR)
    result = run("-s", "-rA")
    result.assert_outcomes(passed=3, errors=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_i*", "E *RuntimeError: bad_mod teardown boom",
        "ERROR test_a.py::test_i - RuntimeError: bad_mod teardown boom",
    ], consecutive=False)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert fixture_log(result) == [
        "setup bad_mod controller", "test a_p controller",
        *in_container("a_i", "bad_mod"),
        "teardown bad_mod controller", "test b_after controller",
    ]


def test_controller_teardown_error_reads_as_in_a_plain_run(pytester, run) -> None:
    """The same teardown error without isolation: same ERROR section, same junit XML."""
    pytester.makeconftest(LOGGING_CONFTEST)
    pytester.makepyfile(**CONTROLLER_TEARDOWN_ERROR)
    isolated = run("-s", "--junitxml=isolated.xml")  # -s: no captured sections, which differ
    plain = run("-s", "-p", "no:isolate", "-W", "ignore::pytest.PytestUnknownMarkWarning",
                "--junitxml=plain.xml")
    isolated.assert_outcomes(passed=3, errors=1)
    plain.assert_outcomes(passed=3, errors=1)

    def cases(name):
        report = read_junit(pytester.path / name)
        return report.suite["tests"], [(case.classname, case.name, case.tags)  # usage properties aside
                                       for case in report.cases]

    assert cases("isolated.xml") == cases("plain.xml")
    error = "ERROR at teardown of test_i"
    assert section(isolated, error) == section(plain, error)
