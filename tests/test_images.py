"""Tests that run inside images: a plain root filesystem (``dir:``) and an OCI image
(``oci:``) holding this machine's system Python, built here (imagebuild.py), in both
modes, as root and (in the rootless lane) as a user. The image is what the test
sees: its files, its interpreter, its environment; each test writes to its own
copy-on-write layer; the host's files are not there."""

from __future__ import annotations

import os
import sys

import pytest

import imagebuild

pytestmark = pytest.mark.skipif(imagebuild.can_build() is not None, reason=str(imagebuild.can_build()))

MODES = ["fork", "fresh"]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

INSIDE = """
import os, sys, pytest

IMAGE = {image!r}

@pytest.mark.isolated(image=IMAGE)
@pytest.mark.parametrize("n", range(2))
def test_sees_the_image(n, tmp_path):
    assert "pytest-isolate test image" in open("/etc/os-release").read()
    assert os.path.realpath(sys.executable) == "/usr/bin/python{version}"
    assert not os.path.exists("/usr/bin/apt") and not os.path.exists("/usr/bin/dpkg")  # the host's
    assert os.environ["PATH"] == {path!r}  # the image's environment (dir: has none: Docker's default)
    assert not os.path.exists("/srv/written-by-a-test")  # by the other one
    open("/srv/written-by-a-test", "w").write(str(n))   # its own copy-on-write layer
    (tmp_path / "out").write_text("ok")

@pytest.mark.isolated
def test_the_host_image_beside_it():
    assert os.path.exists("{host_file}")
"""


@pytest.fixture(scope="session")
def python_root(tmp_path_factory) -> str:
    return imagebuild.python_rootfs(str(tmp_path_factory.mktemp("image") / "rootfs"))


@pytest.fixture(scope="session")
def python_layout(tmp_path_factory, python_root) -> str:
    """An OCI layout: the root filesystem, then a layer that removes /etc/group and adds /etc/motd."""
    path = str(tmp_path_factory.mktemp("layout") / "layout")
    layers = [imagebuild.layer_of_directory(python_root),
              imagebuild.layer_of_files({"etc/group": None, "etc/motd": b"second layer\n"})]
    return imagebuild.oci_layout(path, "py", layers)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    path = str(tmp_path / "cache")
    monkeypatch.setenv("PYTEST_ISOLATE_CACHE", path)
    return path


def host_file() -> str:
    return next(p for p in ("/usr/bin/apt", "/usr/bin/dpkg", "/usr/bin/env") if os.path.exists(p))


@pytest.mark.parametrize("mode", MODES)
def test_a_root_filesystem(pytester, run, python_root, mode) -> None:
    pytester.makepyfile(test_inside=INSIDE.format(image=f"dir:{python_root}", version=imagebuild.VERSION,
                                                  host_file=host_file(), path=DEFAULT_PATH))
    result = run(f"--isolate-mode={mode}", "-v")
    result.assert_outcomes(passed=3)
    assert f"container host ({mode} mode, image dir:{python_root})" in result.stdout.str()


@pytest.mark.parametrize("mode", MODES)
def test_an_oci_image_with_a_whiteout(pytester, run, python_layout, cache, mode) -> None:
    pytester.makepyfile(test_inside=INSIDE.format(image=f"oci:{python_layout}:py", version=imagebuild.VERSION,
                                                  host_file=host_file(), path="/usr/bin:/bin"), test_layers=f"""
import os, pytest

@pytest.mark.isolated(image="oci:{python_layout}:py")
def test_the_second_layer():
    assert not os.path.exists("/etc/group")       # whited out
    assert open("/etc/motd").read() == "second layer\\n"
""")
    result = run(f"--isolate-mode={mode}")
    result.assert_outcomes(passed=4)
    assert os.listdir(os.path.join(cache, "tmp")) == []


def test_pull_policies_and_the_cli(pytester, run, python_layout, cache) -> None:
    image = f"oci:{python_layout}:py"
    pytester.makepyfile(test_one=f"""
import pytest

@pytest.mark.isolated(image={image!r})
def test_one():
    pass
""")
    never = run("--isolate-pull=never")
    assert never.ret == pytest.ExitCode.USAGE_ERROR
    never.stderr.fnmatch_lines([f"ERROR: test_one.py::test_one: invalid 'image': {image} is not in the image store "
                                f"({cache}) and --isolate-pull=never: run `python -m pytest_isolate pull {image}` first"])
    pulled = pytester.run(sys.executable, "-m", "pytest_isolate", "pull", image)  # the CI step
    assert pulled.ret == 0, pulled.stderr.str()
    run("--isolate-pull=never").assert_outcomes(passed=1)
    run("-o", "isolate_pull=always").assert_outcomes(passed=1)
    bad = run("--isolate-pull=sometimes")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: command line --isolate-pull: got 'sometimes'; accepted: 'missing', 'always', "
                              "'never'"])


def test_an_image_without_the_right_python_is_a_usage_error(pytester, run, tmp_path, cache) -> None:
    layout = str(tmp_path / "layout")
    imagebuild.oci_layout(layout, "none", [imagebuild.layer_of_files({"etc/os-release": b"x\n"})])
    imagebuild.oci_layout(layout, "other", [imagebuild.layer_of_files({
        "usr/bin/python3.99": b"", "usr/lib/python3.99/os.py": b""})])
    pytester.makepyfile(test_images=f"""
import pytest

@pytest.mark.isolated(image="oci:{layout}:none")
def test_none():
    pass
""")
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: test_images.py::test_none: invalid 'image': oci:{layout}:none has no "
                                 "Python (looked for /usr/local/bin/python3, /usr/bin/python3, *): the container "
                                 f"host runs pytest with the image's interpreter; use an image with Python "
                                 f"{imagebuild.VERSION}"])
    pytester.makepyfile(test_images=f"""
import pytest

@pytest.mark.isolated(image="oci:{layout}:other")
def test_other():
    pass
""")
    # /usr/bin/python3 is no symlink here: the version comes from the stdlib beside it.
    os.symlink("python3.99", tmp_path / "python3")
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "has no Python" in result.stderr.str()  # python3.99 alone is not a candidate name


@pytest.mark.parametrize("value, message", [
    ("debian:12", "invalid 'image': unknown transport in 'debian:12' (did you mean 'docker://debian:12'?)*"),
    ("oci:", "invalid 'image': 'oci:' names no path*"),
    ("dir:/nonexistent/rootfs", "invalid 'image': dir:/nonexistent/rootfs: /nonexistent/rootfs is not a directory*"),
])
def test_bad_image_references_are_usage_errors(pytester, run, value, message) -> None:
    pytester.makepyfile(test_bad=f"""
import pytest

@pytest.mark.isolated(image={value!r})
def test_bad():
    pass
""")
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: *{message}"])


def test_xdist_workers_share_one_store_and_leave_nothing(pytester, run, python_layout, cache) -> None:
    pytest.importorskip("xdist")
    image = f"oci:{python_layout}:py"
    pytester.makepyfile(test_many=f"""
import pytest

@pytest.mark.isolated(image={image!r})
@pytest.mark.parametrize("n", range(4))
def test_many(n):
    assert open("/etc/motd").read() == "second layer\\n"
""")
    with open("/proc/self/mountinfo") as f:
        mounts_before = f.read()
    run("-n", "2").assert_outcomes(passed=4)  # both workers pull into the empty store at once
    from pytest_isolate.oci.store import for_this_user

    store = for_this_user(cache)
    assert len(os.listdir(store.layers)) == 2 and os.listdir(os.path.join(cache, "tmp")) == []
    assert [r["reference"] for r in store.images()] == [image]
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts_before and cache not in mounts_before


def test_python_picks_the_interpreter_by_hand(pytester, run, python_layout, cache) -> None:
    image = f"oci:{python_layout}:py"
    pytester.makepyfile(test_python=f"""
import sys, pytest

@pytest.mark.isolated(image={image!r}, python="/usr/bin/python3")
def test_by_hand():
    assert sys.executable == "/usr/bin/python{imagebuild.VERSION}"
""")
    result = run("-v")
    result.assert_outcomes(passed=1)
    assert f"image {image} (python /usr/bin/python3)" in result.stdout.str()
    for python, message in (("/usr/bin/nope", f"invalid 'python': /usr/bin/nope is not an executable file in {image}"),
                            ("python3", "invalid 'python': got 'python3'; accepted: 'auto' *")):
        pytester.makepyfile(test_python=f"""
import pytest

@pytest.mark.isolated(image={image!r}, python={python!r})
def test_by_hand():
    pass
""")
        bad = run()
        assert bad.ret == pytest.ExitCode.USAGE_ERROR
        bad.stderr.fnmatch_lines([f"ERROR: *{message}"])
    pytester.makepyfile(test_python="def test_plain():\n    pass\n")
    bad = run("--isolate-python=/usr/bin/python3", "--isolate")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*invalid 'python' (from command line --isolate-python): python= picks an interpreter "
                              "inside an image; the host image runs pytest's own"])


def test_a_deep_image_of_more_layers_than_one_page_of_mount_options_names(pytester, run, tmp_path, python_root,
                                                                           cache) -> None:
    """300 layers: their overlay's lower directories, written out, are longer than the
    page the kernel copies mount options into; each test still gets its overlay."""
    layers = [imagebuild.layer_of_directory(python_root)]
    layers += [imagebuild.layer_of_files({f"srv/layer-{i}": str(i).encode()}) for i in range(299)]
    layout = imagebuild.oci_layout(str(tmp_path / "deep"), "deep", layers)
    pytester.makepyfile(test_deep=f"""
import os, pytest

@pytest.mark.isolated(image="oci:{layout}:deep")
@pytest.mark.parametrize("n", range(2))
def test_every_layer(n):
    assert sorted(os.listdir("/srv")) == sorted(f"layer-{{i}}" for i in range(299))
    assert open("/srv/layer-298").read() == "298"
    assert not os.path.exists("/srv/written")   # by the other test
    open("/srv/written", "w").close()
""")
    run().assert_outcomes(passed=2)


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs a virtual environment to name its parent")
def test_pythonpath_naming_the_directory_that_holds_the_venv(pytester, run, python_layout, cache, monkeypatch) -> None:
    """A project whose PYTHONPATH names the directory the venv lives in (a venv inside
    the project, as scripts/test.sh makes): the image's interpreter still imports
    pytest from the venv, not only the directory that covers it."""
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(sys.prefix))
    pytester.makepyfile(test_path=f"""
import pytest

@pytest.mark.isolated(image="oci:{python_layout}:py")
def test_in_the_image():
    import _pytest
    assert _pytest.__file__.startswith({sys.prefix!r})
""")
    run().assert_outcomes(passed=1)


def test_an_image_whose_python_cannot_import_pytest_says_so_in_one_line(pytester, run, tmp_path, python_root,
                                                                         cache) -> None:
    """An image's sitecustomize that blocks pytest: the container host cannot import
    this plugin's remote side there, and the test's error says that, not "lost the link"."""
    blocker = f"usr/lib/python{imagebuild.VERSION}/sitecustomize.py"
    layers = [imagebuild.layer_of_directory(python_root),
              imagebuild.layer_of_files({blocker: b"import sys\nsys.modules['pytest'] = None\n"})]
    layout = imagebuild.oci_layout(str(tmp_path / "blocked"), "blocked", layers)
    pytester.makepyfile(test_blocked=f"""
import pytest

@pytest.mark.isolated(image="oci:{layout}:blocked")
def test_blocked():
    pass
""")
    result = run("--isolate-mode=fork")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*the container host's Python (/usr/bin/python{imagebuild.VERSION}) failed before it "
                                 "started: *Error: import of pytest halted; None in sys.modules"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert "lost the link" not in result.stdout.str()


@pytest.mark.parametrize("mode", MODES)
def test_a_private_network_and_a_service_in_an_image(pytester, run, python_layout, cache, mode) -> None:
    """The factory is the controller's interpreter inside the image's root, where the
    controller's standard library is not: pyroute2 is imported before it gets there."""
    image = f"oci:{python_layout}:py"
    pytester.makepyfile(test_network=f"""
import socket, pytest
import pytest_isolate as isolate

SERVER = "import socket; s = socket.create_server(('0.0.0.0', 7000)); [s.accept()[0].close() for _ in iter(int, 1)]"
echo = isolate.service("echo", ["/usr/bin/python{imagebuild.VERSION}", "-c", SERVER], ready=isolate.tcp(7000))

@pytest.mark.isolated(image={image!r}, network="backend")
def test_on_a_network():
    assert socket.gethostbyname(socket.gethostname()).startswith("10.")

@pytest.mark.isolated(image={image!r})
def test_with_a_service(echo):
    socket.create_connection((echo.host, 7000), timeout=10).close()
""")
    run(f"--isolate-mode={mode}").assert_outcomes(passed=2)
