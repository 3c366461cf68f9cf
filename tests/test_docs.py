"""The docs against the code: every option is documented where users look for it,
the sample usage errors are what pytest prints, and the recipes of docs/recipes.md
work as written."""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

import pytest

from pytest_isolate.options import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# The rootless lane (test_rootless.py) copies the code and the tests, not docs/: the
# checks of the pages run in the main pass.
needs_docs = pytest.mark.skipif(not (DOCS / "options.md").exists(), reason="docs/ is not in this copy")


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def table_keywords(text: str, after: str) -> list[str]:
    """The `keyword`s that start the rows of the first table after the line ``after``."""
    lines = text[text.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:  # past the header and its rule
        if not line.startswith("|"):
            break
        rows.append(line)
    return [m.group(1) for m in (re.match(r"^\| `(\w+)` \|", row) for row in rows) if m]


# -- the option lists ------------------------------------------------------------------

@needs_docs
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_options_md_has_the_option_its_flag_and_its_ini_key(option) -> None:
    text = read(DOCS / "options.md")
    row = next((line for line in text.splitlines() if line.startswith(f"| {option.name} |")), None)
    assert row is not None, f"docs/options.md's reference has no row for {option.name}"
    assert f"`{option.name}=`" in row
    assert re.search(re.escape(f"`{option.flag}") + r"[=`]", row), f"{option.flag} is not in its row: {row}"
    assert f"`{option.ini}`" in row, f"{option.ini} is not in its row: {row}"


@needs_docs
def test_usage_md_lists_every_marker_keyword() -> None:
    listed = table_keywords(read(DOCS / "usage.md"), "## The marker")
    assert listed == [o.name for o in OPTIONS]


@needs_docs
def test_readme_lists_every_option() -> None:
    listed = table_keywords(read(ROOT / "README.md"), "Marker options (")
    assert listed == [o.name for o in OPTIONS]


@needs_docs
def test_strict_means_limits_only() -> None:
    """The mode is "fresh"; "strict" is a value of the limits option."""
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        assert not re.search(r"\bstrict mode\b", read(page), re.IGNORECASE), page


def test_markers_and_help_name_the_same_options(run) -> None:
    markers = run("--markers")
    line = next(line for line in markers.outlines if line.startswith("@pytest.mark.isolated(**options):"))
    helped = run("--help")
    group = helped.stdout.str()
    assert "run tests in containers (pytest-isolate):" in group
    assert '"run tests in containers (pytest-isolate)"' in line
    for option in OPTIONS:
        assert option.name in line
        assert option.flag in group and option.ini in group
        if option.flag != "--isolate-" + option.name.replace("_", "-"):
            assert f"{option.name}: {option.flag}" in line
    assert "run every test in a fresh container, as if marked @pytest.mark.isolated" in " ".join(group.split())
    assert line.startswith("@pytest.mark.isolated(**options): run this test in a fresh container.")


# -- the sample errors of docs/options.md -------------------------------------------------

MARKER_TEST = "import pytest\n\n@pytest.mark.{}\ndef test_x():\n    pass\n"
# case: (pytest.ini, the marker on test_b.py::test_x, command-line arguments)
SAMPLES = {
    "timeout flag": (None, None, ("--isolate-timeout=-1",)),
    "mount flag": (None, None, ("--isolate-mount=nonexist:/x",)),
    "memory flag": (None, None, ("--isolate-memory=1m",)),
    "ini": ("[pytest]\nisolate_timeout = abc\n", None, ()),
    "marker value": (None, "isolated(timeout=-1)", ()),
    "unknown keyword": (None, "isolated(foo=1)", ()),
    "misspelt keyword": (None, "isolated(tmeout=1)", ()),
    "positional": (None, 'isolated("x")', ()),
    "memory_swap alone": (None, 'isolated(memory_swap="128m")', ()),
    "read-only mount point": (None, 'isolated(mounts=["/tmp:/usr/x"])', ()),
    "misspelt marker": (None, "isolate", ()),
}


@needs_docs
@pytest.mark.parametrize("case", SAMPLES)
def test_the_sample_errors_are_real(pytester, run, case: str) -> None:
    ini, marker, args = SAMPLES[case]
    if ini:
        pytester.makefile(".ini", pytest=ini)
    if marker:
        pytester.makepyfile(test_b=MARKER_TEST.format(marker))
    result = run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line.replace(str(pytester.path), "/tmp/dd") for line in result.errlines if line.startswith("ERROR: ")]
    assert len(errors) == 1, result.errlines
    assert errors[0] in read(DOCS / "options.md").splitlines(), f"not in docs/options.md: {errors[0]}"


# -- docs/recipes.md ------------------------------------------------------------------

def test_recipe_doctests_and_unittest(pytester, run) -> None:
    pytester.makepyfile(mathx='''
        import socket

        def double(x):
            """
            >>> double(2)
            4
            >>> socket.gethostname()
            'isolated'
            """
            return 2 * x
    ''', test_unit='''
        import os
        import socket
        import unittest

        import pytest


        class TestInside(unittest.TestCase):
            @classmethod
            def setUpClass(cls):
                print("setUpClass in pid", os.getpid())

            def setUp(self):
                self.name = socket.gethostname()

            @pytest.mark.isolated(hostname="box")
            def test_hostname(self):
                self.assertEqual(self.name, "box")

            def test_pid(self):
                self.assertEqual(os.getpid(), 2)
    ''')
    result = run("--isolate", "--doctest-modules", "-rP")
    result.assert_outcomes(passed=3)
    assert result.stdout.str().count("setUpClass in pid 2") == 2


class PingServer:
    """A host service on a Unix socket: answers "pong " + what it got."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"pong " + conn.recv(100))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


def test_recipe_a_host_service_on_a_unix_socket(pytester, run) -> None:
    svc = pytester.mkdir("svc")
    server = PingServer(svc / "app.sock")
    pytester.makepyfile(test_service='''
        import socket

        import pytest


        @pytest.mark.isolated(mounts=["./svc:/run/svc"])
        def test_talks_to_the_service():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect("/run/svc/app.sock")
                s.sendall(b"ping")
                assert s.recv(100) == b"pong ping"


        @pytest.mark.isolated
        def test_not_the_abstract_socket():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect("\\0pytest-isolate-docs-" + str({pid}))


        def test_the_abstract_socket_unisolated():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect("\\0pytest-isolate-docs-" + str({pid}))
    '''.replace("{pid}", str(os.getpid())))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0pytest-isolate-docs-{os.getpid()}")
    abstract.listen()
    try:
        result = run("-rA")
    finally:
        server.close()
        abstract.close()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_service.py::test_not_the_abstract_socket - ConnectionRefusedError*"])


def test_recipe_writable_output(pytester, run) -> None:
    from pytest_isolate.runtime import user_ns

    out = pytester.mkdir("out")
    uid = user_ns.host_uid_of_container_root()
    if os.geteuid() == 0:
        os.chown(out, uid, -1)  # the recipe's chown 1000000000 out
    pytester.makepyfile(test_output='''
        import os

        import pytest


        @pytest.mark.isolated(mounts=["./out:/out:rw"])
        def test_writes_a_report(tmp_path):
            (tmp_path / "scratch.txt").write_text("gone after the test")
            with open("/out/report.txt", "w") as f:
                f.write("kept\\n")
            st = os.stat("/out/report.txt")
            assert (st.st_uid, st.st_gid) == (0, 0)  # container root's
    ''')
    result = run()
    result.assert_outcomes(passed=1)
    report = out / "report.txt"
    assert report.read_text() == "kept\n"
    st = report.stat()
    assert (st.st_uid, st.st_gid) == (uid, user_ns.host_gid_of_container_root())
    if os.geteuid() == 0:
        assert uid == 1000000000 or user_ns.subordinate_range("/etc/subuid")
    else:
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert not list(pytester.path.glob("**/scratch.txt"))
