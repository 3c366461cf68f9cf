"""Who owns an image's files inside a container (docs/images.md, Ownership).

As root, and rootless with a subordinate range (/etc/subuid, /etc/subgid, through
newuidmap: runtime/subids.py), an image's uid k is container uid k. Rootless without
one -- here forced with PYTEST_ISOLATE_NO_SUBUID=1 -- every file belongs to container
root, and ``doctor`` says why. The rootless lane runs this file as a user that has a
range (conftest.system_user); as root, the doctor is run as users with and without one.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

import imagebuild
from conftest import IS_ROOT, system_user
from pytest_isolate.runtime import subids

pytestmark = pytest.mark.skipif(imagebuild.can_build() is not None, reason=str(imagebuild.can_build()))

SYSTEM_PYTHON = "/usr/bin/python3"
BEYOND = 70000  # no container has this uid: 65536 ids are mapped


def owners_layer() -> bytes:
    """/srv/user (uid/gid 1000, with a 0600 file), /srv/private (1000's, 0700),
    /srv/root-file (0/0, 0600) and /srv/far (a uid beyond every mapping)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, mode, owner, data in [
            ("srv", tarfile.DIRTYPE, 0o755, 0, b""),
            ("srv/user", tarfile.DIRTYPE, 0o755, 1000, b""),
            ("srv/user/secret", tarfile.REGTYPE, 0o600, 1000, b"the user's\n"),
            ("srv/private", tarfile.DIRTYPE, 0o700, 1000, b""),
            ("srv/private/file", tarfile.REGTYPE, 0o644, 1000, b"private\n"),
            ("srv/root-file", tarfile.REGTYPE, 0o600, 0, b"root's\n"),
            ("srv/far", tarfile.REGTYPE, 0o644, BEYOND, b"far\n"),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.size = kind, mode, owner, owner, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def owners_image(tmp_path_factory) -> str:
    root = imagebuild.python_rootfs(str(tmp_path_factory.mktemp("image") / "rootfs"))
    path = str(tmp_path_factory.mktemp("layout") / "layout")
    imagebuild.oci_layout(path, "owners", [imagebuild.layer_of_directory(root), owners_layer()])
    return f"oci:{path}:owners"


INSIDE = """
import os, pytest

@pytest.mark.isolated(image={image!r})
def test_owners(tmp_path):
    kept = {kept!r}
    user = os.stat("/srv/user/secret")
    assert (user.st_uid, user.st_gid) == ((1000, 1000) if kept else (0, 0))
    assert os.stat("/srv/private").st_uid == (1000 if kept else 0)
    assert (os.stat("/srv/root-file").st_uid, os.stat("/srv/root-file").st_gid) == (0, 0)
    assert os.stat("/srv/far").st_uid == 0  # beyond the mapped ids: container root's
    assert open("/srv/root-file").read() == "root's\\n"
    if kept:  # the test is container root without capabilities: 1000's 0600 file is not its
        with pytest.raises(PermissionError):
            open("/srv/user/secret")
    else:
        assert open("/srv/user/secret").read() == "the user's\\n"
    with open("/srv/new", "w") as f:  # its own copy-on-write layer
        f.write("mine")
    assert os.stat("/srv/new").st_uid == 0
    (tmp_path / "out").write_text("ok")
"""


def run_owners(pytester, run, image: str, kept: bool) -> None:
    cache = pytester.path / "cache"
    pytester.makepyfile(test_owners=INSIDE.format(image=image, kept=kept))
    os.environ["PYTEST_ISOLATE_CACHE"] = str(cache)
    try:
        run().assert_outcomes(passed=1)
        from pytest_isolate.oci.store import for_this_user

        store = for_this_user(str(cache))
        # 1000's directory, seen from the host.
        folders = [os.path.join(store.layers, d, "srv/private") for d in os.listdir(store.layers)]
        [folder] = [p for p in folders if os.path.lexists(p)]
        host_uid = os.lstat(folder).st_uid
        if not kept:
            assert host_uid == os.geteuid() and store.owner_key == "user"
        elif IS_ROOT:
            assert host_uid == store.owner(1000, 1000)[0] > 1000
        else:  # container uid 1000 is the range's 1000th id (container uid 1 is its first)
            mapping = subids.rootless_mapping()
            assert host_uid == mapping.uids[0] + 999 and store.owner_key == mapping.owner_key
        # Prune removes all of it, the range's files and directories included.
        store.forget(image)
        result = subprocess.run([sys.executable, "-m", "pytest_isolate", "prune", "--cache", str(cache)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert os.listdir(store.layers) == [] and os.listdir(cache / "tmp") == []
    finally:
        del os.environ["PYTEST_ISOLATE_CACHE"]
        if os.path.isdir(cache):  # a failed assertion above: what prune can reach
            from pytest_isolate.oci.store import for_this_user

            for_this_user(str(cache)).prune()


def test_image_owners_are_kept(pytester, run, owners_image) -> None:
    if not IS_ROOT and not subids.rootless_mapping().ranged:
        pytest.skip(f"rootless without a subordinate range: {subids.rootless_mapping().why_not}")
    run_owners(pytester, run, owners_image, kept=True)


@pytest.mark.skipif(IS_ROOT, reason="the rootless fallback")
def test_without_a_range_every_file_is_container_roots(pytester, run, owners_image) -> None:
    os.environ[subids.NO_SUBUID_ENV] = "1"  # for the inner pytest and the prune command too
    subids.rootless_mapping.cache_clear()  # this process decides again, as they do
    try:
        assert subids.rootless_mapping().why_not == f"{subids.NO_SUBUID_ENV}=1 is set"
        run_owners(pytester, run, owners_image, kept=False)
    finally:
        del os.environ[subids.NO_SUBUID_ENV]
        subids.rootless_mapping.cache_clear()


def test_subordinate_ranges_are_found_by_name_or_uid(tmp_path) -> None:
    table = tmp_path / "subuid"
    table.write_text("other:100000:65536\nbroken:line\n1234:300000:0\n1234:200000:65536\nalice:400000:10\n")
    assert subids.subordinate_range(str(table), "alice", 1234) == (200000, 65536)  # by uid, the first usable
    assert subids.subordinate_range(str(table), "alice", 999) == (400000, 10)     # by name
    assert subids.subordinate_range(str(table), "bob", 999) is None
    assert subids.subordinate_range(str(tmp_path / "missing"), "alice", 1234) is None


# -- the doctor, as users with and without a range (as root) ---------------------------------

@pytest.fixture(scope="module")
def public_copy():
    work = tempfile.mkdtemp(prefix="pytest-isolate-owners-")
    try:
        os.chmod(work, 0o755)
        shutil.copytree(Path(__file__).resolve().parent.parent / "pytest_isolate", os.path.join(work, "pytest_isolate"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        yield work
    finally:
        shutil.rmtree(work)


def doctor_as(user: str, copy: str) -> dict:
    command = ["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={copy}",
               f"HOME={copy}", SYSTEM_PYTHON, "-B", "-m", "pytest_isolate", "doctor", "--json"]
    done = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return {c["name"]: c for c in json.loads(done.stdout)["checks"]}


@pytest.mark.skipif(not IS_ROOT, reason="creates users: needs root")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}")
def test_doctor_says_which_ownership_rootless_containers_get(public_copy) -> None:
    if not (shutil.which("newuidmap") and shutil.which("newgidmap")):
        pytest.skip("needs newuidmap and newgidmap (Debian: uidmap)")
    with system_user("pytest-isolate-ranged") as user:
        images = doctor_as(user.pw_name, public_copy)["images"]
        start, count = subids.subordinate_range("/etc/subuid", user.pw_name, user.pw_uid)
        assert f"image uids kept (subordinate range {start}+{count} through newuidmap)" in images["finding"]
        assert images["details"]["ownership"]["kept"] is True
    with system_user("pytest-isolate-unranged", subordinate=False) as user:
        checks = doctor_as(user.pw_name, public_copy)
        assert checks["images"]["details"]["ownership"]["kept"] is False
        assert (f"every file belongs to container root (no /etc/subuid range for {user.pw_name}): "
                "install uidmap and add a range to keep image owners") in checks["images"]["finding"]
        assert checks["user namespaces"]["status"] == "ok"  # the one-line map still works


def test_a_failed_unpack_and_an_abandoned_one_leave_nothing(tmp_path) -> None:
    """What a failed or interrupted unpack leaves may belong to the range's ids: the
    store removes it inside the namespace (rootless with a range; directly otherwise)."""
    from pytest_isolate.oci import store as store_module
    from pytest_isolate.oci import unpack

    store = store_module.for_this_user(str(tmp_path / "cache"))
    layer = gzip.compress(owners_layer())
    with pytest.raises(store_module.StoreError, match="not to its diff_id"):
        store.add_layer(io.BytesIO(layer), "sha256:" + "0" * 64, "layer 1/1 of oci:test")
    assert os.listdir(tmp_path / "cache" / "tmp") == [] and os.listdir(store.layers) == []
    # An interrupted pull's leftovers (no live process holds their lock): prune removes them.
    abandoned = tempfile.mkdtemp(prefix="layer-", dir=tmp_path / "cache" / "tmp")
    os.mkdir(os.path.join(abandoned, "root"))

    def unpack_there(reader) -> None:
        unpack.unpack_layer(reader, os.path.join(abandoned, "root"), store.owner)

    if store.namespace is not None:
        store.namespace.call_fed(io.BytesIO(owners_layer()), unpack_there)
    else:
        unpack_there(io.BytesIO(owners_layer()))
    if store.owner is None:  # rootless without a range: the user's
        expected = os.geteuid()
    elif IS_ROOT:
        expected = store.owner(1000, 1000)[0]
    else:
        expected = store.namespace.mapping.uids[0] + 999
    assert os.lstat(os.path.join(abandoned, "root", "srv", "private")).st_uid == expected
    assert store.prune()[0] == 1 and os.listdir(tmp_path / "cache" / "tmp") == []
