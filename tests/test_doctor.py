"""``python -m pytest_isolate doctor``: real checks on the machine the tests run on.

Where a fact differs between hosts (cgroup layout, interpreter location) the expected
value is computed here independently (/proc/cgroups, file modes) instead of trusting
the doctor's own parsing. Failure paths that this host cannot produce (no user
namespaces, cgroup v2 delegation) are driven in-process with monkeypatch.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import system_user
from pytest_isolate import doctor
from pytest_isolate.runtime import syscalls, user_ns

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
WANTED = {"memory", "cpu", "pids"}
UNPRIVILEGED_USER = "pytest-isolate-doctor"
SYSTEM_PYTHON = "/usr/bin/python3"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_isolate", *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def report() -> dict:
    proc = cli("doctor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def by_name(report: dict) -> dict:
    return {check["name"]: check for check in report["checks"]}


def v1_controllers() -> set[str]:
    """Controllers mounted as cgroup v1 hierarchies, from /proc/cgroups (hierarchy id != 0)."""
    with open("/proc/cgroups") as f:
        rows = [line.split() for line in f if not line.startswith("#")]
    return {name for name, hierarchy, _, enabled in rows if hierarchy != "0" and enabled == "1"}


# -- the command line -------------------------------------------------------------------

def test_text_report_has_one_tagged_line_per_check_and_exits_0():
    proc = cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in doctor.NAMES:
        tagged = [line for line in lines if re.match(rf"\[( ok |warn|miss)\] {name}\s", line)]
        assert len(tagged) == 1, (name, proc.stdout)
    assert any(line.startswith("[ ok ] user namespaces") for line in lines)
    assert any(line.startswith("[ ok ] overlayfs") for line in lines)
    # Every check that is not ok is followed by what it means and how to fix it.
    for i, line in enumerate(lines):
        if line.startswith(("[warn]", "[miss]")):
            following = "\n".join(lines[i + 1:i + 8])
            assert "means: " in following and "fix:   " in following, line
    assert lines[-1] == "basic isolation (user namespaces + overlayfs): available"


def test_json_lists_every_check_with_status_and_explanations(report):
    assert [c["name"] for c in report["checks"]] == list(doctor.NAMES)
    assert report["basic_isolation"] is True
    assert report["uid"] == os.geteuid()
    assert report["kernel"] == os.uname().release
    for check in report["checks"]:
        assert check["status"] in ("ok", "warn", "missing")
        assert check["finding"]
        if check["status"] != "ok":
            assert check["meaning"] and check["fix"], check


def test_no_arguments_and_help_list_the_doctor_subcommand():
    for args in ((), ("--help",)):
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert "usage: python -m pytest_isolate" in proc.stdout
        assert re.search(r"^\s+doctor\s+report what this host offers", proc.stdout, re.M)
    proc = cli("doctor", "--help")
    assert proc.returncode == 0 and "--json" in proc.stdout


def test_unknown_subcommand_is_a_usage_error_without_traceback():
    proc = cli("frobnicate")
    assert proc.returncode == 2
    assert "invalid choice: 'frobnicate'" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# -- the checks on this host --------------------------------------------------------------

def test_user_namespaces_and_overlay_are_usable_here(report):
    checks = by_name(report)
    userns, overlay = checks["user namespaces"], checks["overlayfs"]
    assert userns["status"] == "ok", userns
    assert overlay["status"] == "ok", overlay
    assert userns["details"]["rootless"] is (os.geteuid() != 0)
    if os.geteuid() == 0:  # containers of root map onto an unprivileged host range
        (uid0, count), _ = user_ns.root_mapping()
        assert userns["details"]["root_mapping"]["uid"] == uid0 > 0
        assert f"host uid {uid0}+{count}" in userns["finding"]


def test_cgroups_report_matches_the_mounted_hierarchies(report):
    cgroups = by_name(report)["cgroups"]
    mounted_v1 = v1_controllers() & WANTED
    if mounted_v1:  # this machine: v1 hierarchies (plus an empty cgroup2: hybrid)
        assert cgroups["details"]["version"] == "v1"
        assert set(cgroups["details"]["controllers"]) == mounted_v1
        assert {"memory", "pids"} <= mounted_v1
        assert cgroups["finding"].startswith("v1")
        # v1 has no safe delegation: only root can enforce limits there.
        assert cgroups["status"] == ("ok" if os.geteuid() == 0 else "warn")
    else:
        assert cgroups["details"]["version"] == "v2"


def test_seccomp_filters_load_and_landlock_reports_its_abi(report):
    checks = by_name(report)
    assert checks["seccomp"]["status"] == "ok", checks["seccomp"]
    assert checks["seccomp"]["details"]["mode"] in (0, 2)
    landlock = checks["landlock"]
    assert landlock["status"] == "ok", landlock
    assert landlock["details"]["abi"] >= 1
    assert landlock["finding"] == f"ABI {landlock['details']['abi']}"


def test_python_check_matches_directory_permissions(report):
    python = by_name(report)["python"]
    real = os.path.realpath(sys.executable)
    assert python["details"]["realpath"] == real
    closed = [str(p) for p in Path(real).parents if not os.stat(p).st_mode & stat.S_IXOTH]
    if closed:  # e.g. a pyenv interpreter under /root (mode 700)
        assert python["status"] == "warn"
        assert any(d in python["finding"] for d in closed), python["finding"]
    else:
        assert python["details"]["world_traversable"] is True


def test_checks_leave_the_calling_process_untouched():
    def state():
        with open("/proc/self/status") as f:
            fields = [ln for ln in f if ln.startswith(("Seccomp", "NoNewPrivs", "Uid", "Gid"))]
        namespaces = [os.readlink(f"/proc/self/ns/{ns}") for ns in ("user", "mnt")]
        return fields, namespaces, os.getcwd()

    before = state()
    results = doctor.run_checks()
    assert state() == before
    assert {r.name for r in results} == set(doctor.NAMES)


# -- failure paths this host cannot produce ---------------------------------------------------

def test_blocked_user_namespaces_fail_with_the_apparmor_explanation(monkeypatch, capsys):
    """Ubuntu 24.04 style: unprivileged unshare is refused, AppArmor's knob is set."""
    def refuse(flags):
        raise OSError(errno.EPERM, f"unshare({syscalls.describe_flags(flags)}): "
                                   "Operation not permitted")

    knob = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
    real_read_int = doctor._read_int
    monkeypatch.setattr(syscalls, "unshare", refuse)  # the forked probes inherit this
    monkeypatch.setattr(doctor, "_read_int", lambda p: 1 if p == knob else real_read_int(p))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert doctor.run() == 1
    out = capsys.readouterr().out
    finding = r"unshare\(user\): Operation not permitted \[EPERM\]"
    assert re.search(rf"^\[miss\] user namespaces\s+{finding}", out, re.M)
    assert re.search(r"^\[miss\] overlayfs", out, re.M)
    assert "kernel.apparmor_restrict_unprivileged_userns=0" in out
    assert out.rstrip().endswith("basic isolation (user namespaces + overlayfs): NOT available")
    assert doctor.run(as_json=True) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["basic_isolation"] is False
    assert by_name(data)["user namespaces"]["details"]["knobs"][os.path.basename(knob)] == 1


def test_cgroup_v2_delegation_is_read_from_the_systemd_user_subtree(monkeypatch, tmp_path):
    uid = 4242 if os.geteuid() == 0 else os.geteuid()
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    service = tmp_path / f"user.slice/user-{uid}.slice/user@{uid}.service"
    service.mkdir(parents=True)
    (service / "cgroup.subtree_control").write_text("memory pids\n")
    if os.geteuid() == 0:
        os.chown(service, uid, uid)
        monkeypatch.setattr(os, "geteuid", lambda: uid)
    monkeypatch.setattr(doctor, "_cgroup_mounts", lambda: ({}, str(tmp_path)))

    result = doctor.check_cgroups()
    assert result.status == "ok", result
    assert result.details["version"] == "v2"
    assert result.details["delegated"] == str(service)
    assert "delegated to you" in result.finding

    (service / "cgroup.subtree_control").write_text("cpu\n")
    result = doctor.check_cgroups()
    assert result.status == "warn"
    assert "lacks memory, pids" in result.finding
    assert "Delegate=" in result.fix


# -- rootless: doctor run by an unprivileged user -----------------------------------------

@pytest.fixture
def public_copy():
    """A copy of the package in a world-readable temp dir (/work may not be traversable)."""
    tmp = tempfile.mkdtemp(prefix="pytest-isolate-doctor-")
    try:
        os.chmod(tmp, 0o755)
        shutil.copytree(REPO / "pytest_isolate", os.path.join(tmp, "pytest_isolate"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        yield tmp
    finally:
        shutil.rmtree(tmp)


@pytest.fixture
def unprivileged_command():
    """The command prefix that runs a command as an unprivileged user (made for the test
    and removed after it when we are root)."""
    if os.geteuid() != 0:
        yield []  # already unprivileged
        return
    if not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("needs useradd and runuser to create an unprivileged user")
    with system_user(UNPRIVILEGED_USER):
        yield ["runuser", "-u", UNPRIVILEGED_USER, "--"]


def test_doctor_runs_rootless_as_an_unprivileged_user(public_copy, unprivileged_command):
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing")
    command = unprivileged_command + [
        "env", f"PYTHONPATH={public_copy}", f"HOME={public_copy}",
        SYSTEM_PYTHON, "-B", "-m", "pytest_isolate", "doctor", "--json"]
    proc = subprocess.run(command, cwd=public_copy, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["uid"] != 0
    checks = by_name(data)
    userns = checks["user namespaces"]
    assert userns["status"] == "ok", userns
    assert userns["details"]["rootless"] is True
    assert f"container root is your uid {data['uid']}" in userns["finding"]
    assert checks["overlayfs"]["status"] == "ok", checks["overlayfs"]
    assert checks["python"]["status"] == "ok"  # /usr/bin/python3 is world-readable
    if v1_controllers() & WANTED:  # v1: nothing can be delegated to an unprivileged user
        assert checks["cgroups"]["status"] == "warn"
        assert "no safe delegation" in checks["cgroups"]["finding"]


def test_another_plugin_claiming_the_marker_is_a_warning():
    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name}

    assert doctor.check_plugins([Dist("pytest"), Dist("pytest-isolate-container")]).status == doctor.OK
    found = doctor.check_plugins([Dist("pytest_isolated"), Dist("Pytest-Isolate")])
    assert found.status == doctor.WARN
    assert found.finding == ("pytest-isolate is installed: it ships another package named pytest_isolate; "
                             "pytest-isolated is installed: it defines its own @pytest.mark.isolated")
    assert found.fix == "pip uninstall pytest-isolate pytest-isolated"


def test_the_images_check_probes_layers_in_a_user_namespace(report, monkeypatch, tmp_path):
    images = next(c for c in report["checks"] if c["name"] == "images")
    assert images["status"] in ("ok", "warn") and "layer whiteouts and opaque directories work" in images["finding"]
    # A kernel that does not hide what a whiteout covers: the check says what that means.
    from pytest_isolate import doctor_images

    def broken_kernel():
        raise OSError(5, "a whiteout in a lower layer does not hide the file below it")

    monkeypatch.setattr(doctor_images, "probe_layers", broken_kernel)
    result = doctor.check_images()
    assert result.status == "missing" and "does not hide the file below it" in result.finding
    assert result.meaning == "tests cannot run in OCI images here (the host image works)"
    # No zstd reader: a warning naming the packages.
    monkeypatch.undo()
    monkeypatch.setattr(doctor_images, "zstd_reader", lambda: None)
    monkeypatch.setenv("PYTEST_ISOLATE_CACHE", str(tmp_path / "never-made"))
    result = doctor.check_images()
    assert result.status == "warn" and result.fix == "apt install zstd, or pip install zstandard"
    assert "(0 images)" in result.finding and not (tmp_path / "never-made").exists()


def test_the_networks_check_makes_a_bridge_and_a_veth_and_finds_the_qdiscs(report, monkeypatch):
    networks = next(c for c in report["checks"] if c["name"] == "networks")
    assert "private networks, services and allow= work" in networks["finding"]
    # Its netem verdict is the kernel's: the same probe a container's netem= meets.
    def kernel_has(kind: str, extra: str) -> bool:
        code = ("from pyroute2 import IPRoute\nip = IPRoute()\nip.link('add', ifname='v0', kind='veth', "
                f"peer={{'ifname': 'v1'}})\nip.tc('add', '{kind}', index=ip.link_lookup(ifname='v0')[0], {extra})\n")
        return subprocess.run(["unshare", "--user", "--map-root-user", "--net", sys.executable, "-c", code],
                              capture_output=True, timeout=60).returncode == 0

    has_netem = kernel_has("netem", "delay=1000")
    assert networks["details"]["netem"] is has_netem
    assert (networks["status"] == "ok") is has_netem
    assert networks["details"]["tbf"] is kernel_has("tbf", "rate='1mbit', burst=16384, latency='100ms'")

    from pytest_isolate import doctor_networks

    def broken_kernel(report_fd):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(doctor_networks, "probe", broken_kernel)
    result = doctor.check_networks()
    assert result.status == doctor.WARN and result.finding.startswith("no private network can be made")
