"""Options: registration, layering (ini < command line < marker), mounts, usage errors,
``-p no:isolate`` and ``--isolate``. Values are observed from inside real containers:
inner tests print ``OBS <name> <json>`` and run with ``-rP`` so that the captured
output of passing tests comes back in the summary."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest

OBSERVE = """
import json, os, socket

def observe(name, **extra):
    env = {k[4:]: v for k, v in os.environ.items() if k.startswith("ISO_")}
    data = {"hostname": socket.gethostname(), "pid": os.getpid(), "env": env, **extra}
    print("OBS " + name + " " + json.dumps(data, sort_keys=True))
"""


def observations(result: pytest.RunResult) -> dict[str, dict]:
    """Every ``OBS name {...}`` line printed by the inner tests, by name."""
    found = {}
    for line in result.outlines:
        match = re.match(r"^OBS (\S+) (\{.*\})$", line)
        if match:
            found[match.group(1)] = json.loads(match.group(2))
    return found


def assert_clean_usage_error(result: pytest.RunResult, *fragments: str) -> str:
    """Exit code 4, no traceback, and one line with every fragment; returns that line."""
    output = result.outlines + result.errlines
    assert result.ret == pytest.ExitCode.USAGE_ERROR, "\n".join(output)
    assert not any("Traceback" in line or "INTERNALERROR" in line for line in output), "\n".join(output)
    lines = [line for line in output if all(f in line for f in fragments)]
    assert lines, f"no line with all of {fragments}:\n" + "\n".join(output)
    return lines[0]


# -- registration ---------------------------------------------------------------------

def test_markers_lists_isolated(run) -> None:
    result = run("--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["@pytest.mark.isolated(**options): run this test in a fresh container*"])


def test_help_shows_one_isolate_group_with_every_option(run) -> None:
    result = run("--help")
    assert result.ret == 0
    lines = result.outlines
    headers = [i for i, line in enumerate(lines) if "(pytest-isolate):" in line]
    assert len(headers) == 1, headers
    group = []
    for line in lines[headers[0] + 1:]:
        if not line.strip():
            break
        group.append(line)
    flags = ["--isolate", "--isolate-mode", "--isolate-timeout", "--isolate-hostname",
             "--isolate-env", "--isolate-mount", "--isolate-image", "--isolate-seccomp",
             "--isolate-cap-add", "--isolate-landlock", "--isolate-system-paths", "--isolate-memory",
             "--isolate-memory-swap", "--isolate-cpus", "--isolate-pids", "--isolate-ulimit",
             "--isolate-limits", "--isolate-capture-limit", "--isolate-usage", "--isolate-pull", "--isolate-python",
             "--isolate-network", "--isolate-allow", "--isolate-netem", "--isolate-outbound",
             "--isolate-insecure-registry", "--isolate-flake", "--isolate-flake-report", "--isolate-flake-stop-early"]
    defined = [re.match(r"^\s+(--[\w-]+)", line).group(1) for line in group if re.match(r"^\s+--", line)]
    assert sorted(defined) == sorted(flags)
    # No isolate option is defined outside the group.
    everywhere = [line for line in lines if re.match(r"^\s+--isolate", line)]
    assert len(everywhere) == len(flags)


# -- layering -------------------------------------------------------------------------

LAYERS = OBSERVE + """
import pytest

@pytest.mark.isolated
def test_plain():
    observe("plain")

@pytest.mark.isolated(hostname="from-marker", env={"ISO_C": "marker"})
def test_marker():
    observe("marker")

@pytest.mark.isolated(hostname="from-class", env={"ISO_K": "class", "ISO_M": "class"})
class TestClass:
    def test_class_only(self):
        observe("class_only")

    @pytest.mark.isolated(hostname="from-method", env={"ISO_M": "method"})
    def test_method(self):
        observe("method")
"""

INI = {"A": "ini", "B": "ini", "C": "ini"}


@pytest.mark.parametrize(
    "cli, plain",
    [
        pytest.param([], {"hostname": "from-ini", "env": INI}, id="ini"),
        pytest.param(["--isolate-hostname=from-cli", "--isolate-env", "ISO_B=cli", "--isolate-env=ISO_C=cli"],
                     {"hostname": "from-cli", "env": {**INI, "B": "cli", "C": "cli"}}, id="ini+cli"),
    ],
)
def test_layering_ini_then_cli_then_class_then_method_marker(pytester, run, cli, plain) -> None:
    pytester.makeini("[pytest]\nisolate_hostname = from-ini\nisolate_env =\n"
                     "    ISO_A=ini\n    ISO_B=ini\n    ISO_C=ini\n")
    pytester.makepyfile(test_layers=LAYERS)
    result = run("-rP", *cli)
    result.assert_outcomes(passed=4)
    seen = observations(result)
    base = plain["env"]
    assert {k: v["hostname"] for k, v in seen.items()} == {
        "plain": plain["hostname"], "marker": "from-marker", "class_only": "from-class", "method": "from-method",
    }
    assert seen["plain"]["env"] == base
    assert seen["marker"]["env"] == {**base, "C": "marker"}
    assert seen["class_only"]["env"] == {**base, "K": "class", "M": "class"}
    assert seen["method"]["env"] == {**base, "K": "class", "M": "method"}  # closest marker wins per key
    assert {v["pid"] for v in seen.values()} == {2}


BOUNDARIES = OBSERVE + """
import time
import pytest

@pytest.mark.isolated(hostname="a" * 31 + "." + "b" * 32, env={"ISO_N": 5}, timeout=None)
def test_longest_hostname_and_number_env():
    observe("long")

@pytest.mark.isolated
def test_cli_none_disables_the_ini_timeout():
    # Longer than the ini timeout; where that applies, until it ends the test.
    time.sleep(float(os.environ["SLOW_TEST_SLEEPS"]))
    observe("slow")

@pytest.mark.isolated(timeout=None)
def test_marker_none_disables_it_too():
    time.sleep(6)  # longer than the ini timeout
"""


def test_boundary_values_and_disabling_a_timeout(pytester, run, monkeypatch) -> None:
    # 5 s from the container's start: ample for a fresh interpreter to reach the call
    pytester.makeini("[pytest]\nisolate_timeout = 5\n")
    pytester.makepyfile(test_bounds=BOUNDARIES)
    monkeypatch.setenv("SLOW_TEST_SLEEPS", "6")
    result = run("-rP", "--isolate-timeout=none")
    result.assert_outcomes(passed=3)
    seen = observations(result)
    assert seen["long"]["hostname"] == "a" * 31 + "." + "b" * 32
    assert seen["long"]["env"] == {"N": "5"}
    assert "slow" in seen
    # Without the command line, the ini timeout applies (the marker's None still wins):
    # the slow test would sleep an hour, the timeout is the only clock that ends it.
    monkeypatch.setenv("SLOW_TEST_SLEEPS", "3600")
    result = run("-rf")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["Timeout: the test ran longer than timeout=5s*",
                                 "FAILED test_bounds.py::test_cli_none_disables_the_ini_timeout*"])


def test_single_label_hostname_of_64_characters(pytester, run) -> None:
    pytester.makepyfile(test_h64=OBSERVE + """
import pytest

@pytest.mark.isolated(hostname="h" * 64)
def test_it():
    observe("h64")
""")
    result = run("-rP")  # the usage error for 65 promises "at most 64": 64 is accepted
    result.assert_outcomes(passed=1)
    assert observations(result)["h64"]["hostname"] == "h" * 64


# -- mounts ---------------------------------------------------------------------------

MOUNTS = """
import errno, os, pytest

def read(path):
    with open(path) as f:
        return f.read()

@pytest.mark.isolated(mounts=["./data:/data:ro"])
def test_ro_dir_is_readable_not_writable():
    assert read("/data/hello.txt") == "from tests/data"
    with pytest.raises(OSError) as exc:
        open("/data/new.txt", "w")
    assert exc.value.errno == errno.EROFS

@pytest.mark.isolated(mounts=["./data:/data"])
def test_ro_is_the_default():
    with pytest.raises(OSError) as exc:
        open("/data/new.txt", "w")
    assert exc.value.errno == errno.EROFS

@pytest.mark.isolated(mounts=["./rwdata:/rw:rw"])
def test_rw_dir_is_writable():
    with open("/rw/written-inside.txt", "w") as f:
        f.write("written inside")

@pytest.mark.isolated(mounts=["data/hello.txt:/single/hello.txt"])
def test_single_file():
    assert read("/single/hello.txt") == "from tests/data"
    assert os.listdir("/single") == ["hello.txt"]

@pytest.mark.isolated
def test_cli_and_ini_mounts():
    assert read("/from-cli/c.txt") == "from work/clidata"
    assert read("/from-ini/i.txt") == "from inidata"
    assert read("/shared/s.txt") == "ini"

@pytest.mark.isolated(mounts=["./data:/shared"])
def test_marker_mount_replaces_ini_mount_at_same_destination():
    assert os.listdir("/shared") == ["hello.txt"]
"""


def test_mounts_from_marker_cli_and_ini_resolve_relative_sources(pytester, run, monkeypatch) -> None:
    """Marker sources are relative to the test file, CLI ones to the invocation dir,
    ini ones to the ini file's dir: each source exists only in its own base."""
    root = pytester.path
    tests = root / "tests"
    (tests / "data").mkdir(parents=True)
    (tests / "data" / "hello.txt").write_text("from tests/data")
    rw = tests / "rwdata"
    rw.mkdir()
    rw.chmod(0o777)  # as root, container root is an unprivileged host uid
    (root / "work" / "clidata").mkdir(parents=True)
    (root / "work" / "clidata" / "c.txt").write_text("from work/clidata")
    (root / "inidata").mkdir()
    (root / "inidata" / "i.txt").write_text("from inidata")
    (root / "shared").mkdir()
    (root / "shared" / "s.txt").write_text("ini")
    (tests / "test_mounts.py").write_text(MOUNTS)
    pytester.makeini("[pytest]\nisolate_mounts =\n    inidata:/from-ini\n    shared:/shared:ro\n")
    monkeypatch.chdir(root / "work")
    result = run(str(tests), "--isolate-mount", "clidata:/from-cli")
    result.assert_outcomes(passed=6)
    assert (rw / "written-inside.txt").read_text() == "written inside"
    assert not (tests / "data" / "new.txt").exists()


def test_mount_on_a_new_path_in_a_read_only_image_directory_is_a_usage_error(pytester, run) -> None:
    """The host image's /etc is a read-only bind: only a path that exists there can be a
    mount point, and the run says so before any test runs."""
    assert not os.path.lexists("/etc/pytest-isolate-conf")
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "f.txt").write_text("hi")
    pytester.makepyfile(test_etc="""
        import pytest

        @pytest.mark.isolated(mounts=["data:/etc/pytest-isolate-conf"])
        def test_it():
            assert open("/etc/pytest-isolate-conf/f.txt").read() == "hi"
    """)
    result = run()
    assert_clean_usage_error(result, "test_etc.py::test_it: invalid 'mounts'",
                             "/etc/pytest-isolate-conf does not exist inside /etc, a read-only part of the image",
                             "accepted: a destination that exists there, or one outside it")


# -- usage errors ---------------------------------------------------------------------

MARKER_ERRORS = [
    ("hostnam='x'", ["unknown keyword 'hostnam'", "accepted: mode, image, timeout, hostname, env, mounts"]),
    ("'fresh'", ["keyword options only", "positional", "accepted keywords: mode"]),
    ("timeout=-1", ["invalid 'timeout'", "got -1", "accepted: a number of seconds > 0"]),
    ("timeout='abc'", ["invalid 'timeout'", "got 'abc'", "accepted: a number of seconds > 0"]),
    ("timeout=True", ["invalid 'timeout'", "got True", "accepted: a number of seconds > 0"]),
    ("hostname='a b'", ["invalid 'hostname'", "'a b'", "accepted: a hostname"]),
    ("hostname='a' * 65", ["invalid 'hostname'", "accepted: a hostname of at most 64"]),
    ("env=42", ["invalid 'env'", "got 42", "accepted: a dict"]),
    ("env={'ISO_X': None}", ["invalid 'env'", "None", "accepted: a str"]),
    ("mounts=['missing:/data']", ["invalid 'mounts'", "missing", "does not exist"]),
    ("mounts=['data:relative']", ["invalid 'mounts'", "destination must be an absolute path"]),
    ("mounts=['data:/']", ["invalid 'mounts'", "destination must be below /"]),
    ("mounts=['data:/proc/x']", ["invalid 'mounts'", "/proc/x is reserved"]),
    ("mounts=['data:/data:rx']", ["invalid 'mounts'", "'data:/data:rx'", "accepted: 'SRC:DST[:ro|rw]'"]),
    ("mode='spawn'", ["invalid 'mode'", "'spawn'", "accepted: 'fork', 'fresh'"]),
    ("image='debian'", ["invalid 'image'", "'debian'", "accepted: 'host'"]),
]


@pytest.mark.parametrize("args, fragments", MARKER_ERRORS, ids=[a for a, _ in MARKER_ERRORS])
def test_bad_marker_is_a_usage_error_naming_the_test(pytester, run, args, fragments) -> None:
    (pytester.path / "data").mkdir()
    pytester.makepyfile(test_bad=f"""
        import pytest

        @pytest.mark.isolated({args})
        def test_it():
            pass
    """)
    assert_clean_usage_error(run(), "test_bad.py::test_it", "@pytest.mark.isolated", *fragments)


CLI_ERRORS = [
    ("--isolate-timeout=abc", ["invalid 'timeout'", "accepted: a number of seconds > 0"]),
    ("--isolate-timeout=-1", ["invalid 'timeout'", "accepted: a number of seconds > 0"]),
    ("--isolate-hostname=a b", ["invalid 'hostname'", "accepted: a hostname"]),
    ("--isolate-env=NOEQUALS", ["invalid 'env'", "'NOEQUALS'", "accepted: KEY=VALUE"]),
    ("--isolate-mount=missing:/data", ["invalid 'mounts'", "does not exist"]),
    ("--isolate-mount=data:/dev/x", ["invalid 'mounts'", "reserved"]),
    ("--isolate-mode=spawn", ["invalid 'mode'", "accepted: 'fork', 'fresh'"]),
    ("--isolate-image=debian", ["invalid 'image'", "accepted: 'host'"]),
]


@pytest.mark.parametrize("arg, fragments", CLI_ERRORS, ids=[a for a, _ in CLI_ERRORS])
def test_bad_command_line_value_is_a_usage_error(pytester, run, arg, fragments) -> None:
    (pytester.path / "data").mkdir()
    pytester.makepyfile("def test_it(): pass")
    flag = arg.split("=", 1)[0]
    assert_clean_usage_error(run(arg), f"command line {flag}", *fragments)


INI_ERRORS = [
    ("isolate_timeout = -1", ["invalid 'timeout'", "accepted: a number of seconds > 0"]),
    ("isolate_hostname = a_b", ["invalid 'hostname'", "accepted: a hostname"]),
    ("isolate_mode = spawn", ["invalid 'mode'", "accepted: 'fork', 'fresh'"]),
    ("isolate_image = debian", ["invalid 'image'", "accepted: 'host'"]),
    ("isolate_env =\n    NOEQUALS", ["invalid 'env'", "accepted: KEY=VALUE"]),
    ("isolate_mounts =\n    data:relative", ["invalid 'mounts'", "destination must be an absolute path"]),
]


@pytest.mark.parametrize("line, fragments", INI_ERRORS, ids=[a.split(" ")[0] for a, _ in INI_ERRORS])
def test_bad_ini_value_is_a_usage_error_naming_the_key(pytester, run, line, fragments) -> None:
    (pytester.path / "data").mkdir()
    pytester.makeini(f"[pytest]\n{line}\n")
    pytester.makepyfile("def test_it(): pass")
    key = line.split(" ")[0]
    assert_clean_usage_error(run(), f"ini key {key}", "tox.ini", *fragments)


def test_bad_isolate_ini_bool_names_the_key(pytester, run) -> None:
    pytester.makeini("[pytest]\nisolate = maybe\n")
    pytester.makepyfile("def test_it(): pass")
    assert_clean_usage_error(run(), "isolate", "maybe", "true")


# -- switching the plugin off, and on for everything ------------------------------------

def test_no_isolate_disables_the_plugin(pytester, run) -> None:
    pytester.makepyfile(test_plain=OBSERVE + """
import pytest

@pytest.mark.isolated(hostname="never")
def test_it():
    observe("it")
""")
    result = run("-p", "no:isolate", "-rP")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*PytestUnknownMarkWarning: Unknown pytest.mark.isolated*"])
    seen = observations(result)["it"]
    assert seen["hostname"] == socket.gethostname()
    assert seen["pid"] != 2
    assert "container host" not in result.stdout.str()  # no pytest-isolate summary


ISOLATE_ALL = OBSERVE + '''
import unittest
import pytest

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    observe(f"param{n}")

class TestClass:
    def test_method(self):
        observe("method")

class Case(unittest.TestCase):
    def test_unittest(self):
        observe("unittest")

def doctested():
    """
    >>> import os, socket
    >>> (os.getpid(), socket.gethostname())
    (2, 'isolated')
    """
'''


@pytest.mark.parametrize("how", ["--isolate", "ini"])
def test_isolate_flag_isolates_every_kind_of_test(pytester, run, how) -> None:
    pytester.makepyfile(test_all=ISOLATE_ALL)
    if how == "ini":
        pytester.makeini("[pytest]\nisolate = true\n")
    result = run("--doctest-modules", "-rP", *([how] if how != "ini" else []))
    result.assert_outcomes(passed=5)
    seen = observations(result)
    assert sorted(seen) == ["method", "param1", "param2", "unittest"]
    for name, data in seen.items():
        assert (data["pid"], data["hostname"]) == (2, "isolated"), name
    result.stdout.fnmatch_lines(["isolate: every test in a container*"])
    # The doctest's own check (pid 2, hostname 'isolated') fails without the plugin.
    plain = run("--doctest-modules", "-p", "no:isolate")
    assert (plain.parseoutcomes()["passed"], plain.parseoutcomes()["failed"]) == (4, 1)


@pytest.mark.needs_root
def test_a_read_only_mount_that_cannot_be_idmapped_is_bound_plainly_with_a_note(pytester, run) -> None:
    """As root, read-only sources are idmapped to container root; sysfs cannot be
    (no filesystem support): it is bound as it is, and the summary says why."""
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.isolated(mounts=["/sys/kernel/mm:/mnt/mm:ro"])
        def test_bound():
            assert "transparent_hugepage" in os.listdir("/mnt/mm")
        """
    )
    result = run()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*note: /sys/kernel/mm is not idmapped (sysfs: *): container root reads it as an "
                                 "unprivileged uid; its filesystem needs idmapped mounts (tmpfs: Linux 6.3+), "
                                 "or make it world-readable*"])
