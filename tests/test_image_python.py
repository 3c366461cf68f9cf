"""``python="auto"``: the image's interpreter of pytest's major.minor, else one of
another version that has pytest>=8.0 installed (then the image's pytest runs the
tests, with this plugin bound in). Images built here (imagebuild.py): pyenv's Python
3.9 with pytest 8.0.2 really runs tests; the refusals need only the files that are
looked at, since nothing of an image runs on the host to find out."""

from __future__ import annotations

import os
import sys

import pytest

import imagebuild
from pytest_isolate import images

CONTROLLER = f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.fixture(scope="module")
def python39_image(tmp_path_factory) -> str:
    python = imagebuild.other_python()
    if python is None:
        pytest.skip(f"needs a readable Python {imagebuild.OTHER_VERSION} (pyenv's, in /root: as root only) "
                    "to build an image of another version")
    if not os.path.isdir(f"{imagebuild.OTHER_PYTEST_SITE}/pytest"):
        pytest.skip(f"needs pytest for Python {imagebuild.OTHER_VERSION} in {imagebuild.OTHER_PYTEST_SITE}")
    return imagebuild.other_python_rootfs(str(tmp_path_factory.mktemp("python39") / "rootfs"), python)


@pytest.mark.parametrize("mode", ["fork", "fresh"])
def test_an_image_of_another_python_runs_the_tests_with_its_own_pytest(pytester, run, python39_image, mode) -> None:
    import pytest_isolate

    pytester.makepyfile(test_inside=f"""
        import sys
        import pytest

        pytestmark = pytest.mark.isolated(image="dir:{python39_image}")

        def test_pass():
            import os, pytest_isolate
            assert sys.version_info[:2] == (3, 9) and os.path.realpath(sys.executable) == "/usr/local/bin/python3.9"
            assert pytest.__version__ == "8.0.2"
            assert pytest.__file__ == "/usr/local/lib/python3.9/site-packages/pytest/__init__.py"
            assert pytest_isolate.__file__ == {pytest_isolate.__file__!r}  # the controller's, bound in

        def test_fail():
            assert [1, 2] == [1, 3]

        def test_skip():
            pytest.skip("skipped in 3.9")
    """)
    result = run("-v", "-rs", f"--isolate-mode={mode}")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["E *assert [[]1, 2[]] == [[]1, 3[]]*",  # with or without CI's verbose diff
                                 f"container host ({mode} mode, image dir:{python39_image})*",
                                 "SKIPPED * skipped in 3.9"])


def fake_python(root, version: str, pytest_files: dict[str, str] | None = None, at: str = "/usr/local") -> str:
    """A root filesystem with what is looked at of a Python ``version`` (its binary, its
    os.py) and ``pytest_files`` in its site-packages: enough to be refused."""
    os.makedirs(f"{root}{at}/bin")
    with open(f"{root}{at}/bin/python{version}", "w") as f:
        f.write("not run\n")
    os.chmod(f"{root}{at}/bin/python{version}", 0o755)
    os.symlink(f"python{version}", f"{root}{at}/bin/python3")
    os.makedirs(f"{root}{at}/lib/python{version}/site-packages")
    open(f"{root}{at}/lib/python{version}/os.py", "w").close()
    for path, text in (pytest_files or {}).items():
        path = f"{root}{at}/lib/python{version}/site-packages/{path}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return str(root)


OTHER = "3.9" if CONTROLLER != "3.9" else "3.10"
PYTEST_7 = {"pytest/__init__.py": "", "pytest-7.4.4.dist-info/METADATA": "Name: pytest\nVersion: 7.4.4\n"}
PYTEST_8 = {"pytest/__init__.py": "", "pytest-8.3.1.dist-info/METADATA": "Name: pytest\nVersion: 8.3.1\n"}


def resolve(root: str) -> images.Image:
    return images.resolve(f"dir:{root}", [])


def test_the_refusals_say_what_was_found_and_what_to_do(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(images.ImageProblem, match=rf"dir:{empty} has no Python \(looked for /usr/local/bin/python3, "
                                                  rf".*\): .*use an image with Python {CONTROLLER}$"):
        resolve(str(empty))
    bare = fake_python(tmp_path / "bare", OTHER)
    with pytest.raises(images.ImageProblem, match=rf"^dir:{bare} has Python {OTHER} \(/usr/local/bin/python{OTHER}\) "
                                                  rf"without pytest, and pytest here runs on Python {CONTROLLER}: "
                                                  rf"install 'pytest>=8.0' in the image \(its pytest then runs the "
                                                  rf"tests\), use an image with Python {CONTROLLER}, or run pytest "
                                                  rf"with the image's Python version$"):
        resolve(bare)
    old = fake_python(tmp_path / "old", OTHER, PYTEST_7)
    with pytest.raises(images.ImageProblem, match=rf"^dir:{old} has pytest 7.4.4 for Python {OTHER} "
                                                  rf"\(/usr/local/lib/python{OTHER}/site-packages\); pytest-isolate "
                                                  rf"needs pytest>=8.0 there, as pytest here runs on Python "
                                                  rf"{CONTROLLER}: upgrade pytest in the image \(pip install "
                                                  rf"'pytest>=8.0'\), or use an image with Python {CONTROLLER}$"):
        resolve(old)


def test_what_counts_as_the_images_pytest(tmp_path) -> None:
    image = resolve(fake_python(tmp_path / "new", OTHER, PYTEST_8))
    assert (image.python, image.pytest) == (f"/usr/local/bin/python{OTHER}", "8.3.1")
    # Only this plugin and the project are bound: the controller's packages are for another Python.
    plugin = os.path.dirname(images.__file__)
    binds = [e["dst"] for e in image.entries if e["type"] == "bind"]
    assert plugin in binds or any(plugin.startswith(b + "/") for b in binds)
    assert not [b for b in binds if "site-packages" in b.split("/") and not plugin.startswith(b)]
    assert image.sys_path[0] == os.path.dirname(plugin)
    # Debian's layout: python3-pytest in /usr/lib/python3/dist-packages, an egg-info.
    debian = fake_python(tmp_path / "debian", OTHER, at="/usr")
    folder = f"{debian}/usr/lib/python3/dist-packages"
    os.makedirs(f"{folder}/pytest")
    open(f"{folder}/pytest/__init__.py", "w").close()
    os.makedirs(f"{folder}/pytest-8.1.2.egg-info")
    with open(f"{folder}/pytest-8.1.2.egg-info/PKG-INFO", "w") as f:
        f.write("Metadata-Version: 2.1\nName: pytest\nVersion: 8.1.2\n")
    assert resolve(debian).pytest == "8.1.2"
    # Without metadata, _pytest/_version.py; a symlink is never followed onto the host.
    versioned = fake_python(tmp_path / "versioned", OTHER, {"pytest/__init__.py": "",
                                                           "_pytest/_version.py": "__version__ = version = '8.2.0'\n"})
    assert resolve(versioned).pytest == "8.2.0"
    linked = fake_python(tmp_path / "linked", OTHER, {"pytest/__init__.py": ""})
    host_file = tmp_path / "host-metadata"
    host_file.write_text("Version: 9.9.9\n")
    site_packages = f"{linked}/usr/local/lib/python{OTHER}/site-packages"
    os.makedirs(f"{site_packages}/pytest-9.9.9.dist-info")
    os.symlink(host_file, f"{site_packages}/pytest-9.9.9.dist-info/METADATA")
    with pytest.raises(images.ImageProblem, match=r"has pytest of an unknown version for Python"):
        resolve(linked)
    # The controller's major.minor wins: its pytest and packages, whatever the image has.
    same = fake_python(tmp_path / "same", CONTROLLER, PYTEST_7)
    assert resolve(same).pytest is None


def test_a_refusal_is_one_clear_line_in_the_run(pytester, run, tmp_path) -> None:
    old = fake_python(tmp_path / "old", OTHER, PYTEST_7)
    pytester.makepyfile(test_x=f"""
        import pytest

        @pytest.mark.isolated(image="dir:{old}")
        def test_x():
            pass
    """)
    result = run()
    output = result.stdout.str() + result.stderr.str()
    assert f"dir:{old} has pytest 7.4.4 for Python {OTHER}" in output and "Traceback" not in output
    assert result.ret != 0
