"""Fuzzing the option input (marker, command line, ini) with Hypothesis: every bad value
is a usage error (exit 4, no traceback) that says what is accepted; every good value is
accepted in the right shape. The inputs of bugs the fuzzers once found are kept at the
end as regression cases."""

from __future__ import annotations

import json
import keyword
import math
import os
import posixpath
import re

import iniconfig
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pytest_isolate import options as opts
from pytest_isolate.runtime.capabilities import NUMBERS

FAST = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
E2E = settings(max_examples=10, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NAMES = [option.name for option in opts.OPTIONS]
EXPLAINS = ("accepted", "does not exist", "reserved", "must", "NUL byte")
# Allow by default: a profile that refuses exit_group leaves the test spinning forever.
PROFILE = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["chroot"], "action": "SCMP_ACT_ERRNO"}]}
PID_MAX_LIMIT = 4 << 20  # the kernel refuses a larger pids.max (EINVAL)
HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]+(?<!-)(\.(?!-)[A-Za-z0-9-]+(?<!-))*")


def populate(directory) -> str:
    """Create the files that the valid strategies name relative to ``directory``."""
    os.makedirs(os.path.join(directory, "sub"), exist_ok=True)
    for name, text in (("data.txt", "x"), ("profile.json", json.dumps(PROFILE))):
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return str(directory)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return populate(tmp_path_factory.mktemp("base"))


# -- strategies ---------------------------------------------------------------------

WORDS = [
    "", " ", "0", "-1", "1e400", "nan", "inf", "none", "None", "fork", "fresh", "host", "default",
    "unconfined", "masked", "ALL", "NET_ADMIN", "cap_sys_admin", "on", "off", "true", "/", "//",
    "/tmp", "/mnt/x", "/proc", "/dev/x", "/.pytest-isolate", "..", ".", "~", "sub", "data.txt",
    "profile.json", "ro", "rw", "A", "=", "A=1", "-", "a.b", "a..b", "é", "\0", "\n", "\t"]


def joined(words: list[str]) -> st.SearchStrategy[str]:
    return st.tuples(st.lists(st.sampled_from(words), min_size=1, max_size=4), st.sampled_from(":=,/ ")).map(
        lambda t: t[1].join(t[0]))


TOKENS = st.sampled_from(WORDS)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary(),
                    TOKENS, joined(WORDS))
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
    st.dictionaries(st.one_of(st.text(), TOKENS, st.integers()), inner, max_size=4)), max_leaves=8)
line = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))  # one printable line
cli_text = st.one_of(st.text(st.characters(blacklist_characters="\0\n\r", blacklist_categories=("Cs",))),
                     joined([w for w in WORDS if w not in ("\0", "\n")]))
ini_text = st.one_of(st.text(line), joined([w for w in WORDS if w.isprintable()]))

segment = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,8}", fullmatch=True)
abs_path = st.lists(segment, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
hostname = st.lists(label, min_size=1, max_size=5).map(".".join).filter(lambda h: len(h) <= 64)
positive = st.floats(min_value=1e-3, max_value=1e6) | st.integers(1, 10**6)
env_key = st.text(line, min_size=1, max_size=8).filter(lambda k: "=" not in k and k.strip() == k)
env_line = st.tuples(env_key, st.text(line, max_size=8)).map("=".join)
mount = st.tuples(st.sampled_from([".", "sub", "data.txt", "./sub/..", "/tmp"]), st.sampled_from(["/mnt", "/srv"]),
                  st.lists(segment, min_size=1, max_size=3), st.sampled_from(["", ":ro", ":rw"])).map(
    lambda t: f"{t[0]}:{t[1]}/{'/'.join(t[2])}{t[3]}")
cpus = st.floats(0.25, 1e5) | st.integers(1, 64)  # 0.01 works, but a test then takes 5 s
limit = st.integers(-1, 2**40)
soft_hard = st.tuples(st.integers(0, 2**40), st.integers(0, 2**40) | st.just(-1)).map(
    lambda t: t if t[1] == -1 else tuple(sorted(t))) | st.just((-1, -1))
ulimit = st.tuples(st.sampled_from(opts.RLIMITS), soft_hard).map(lambda t: f"{t[0]}={t[1][0]}:{t[1][1]}")


def size(low: int, high: int) -> st.SearchStrategy[str]:
    """Docker-style sizes from ``low`` to ``high`` MiB."""
    return st.tuples(st.integers(low, high), st.sampled_from(["m", "M", "mb", "MiB", " m"])).map(
        lambda t: f"{t[0]}{t[1]}")


cap = st.tuples(st.sampled_from(sorted(NUMBERS) + ["ALL"]), st.booleans(), st.booleans()).map(
    lambda t: (lambda n: n.lower() if t[2] else n)(t[0].replace("CAP_", "") if t[1] else t[0]))
VALID_TEXT = {  # single-line strings, as the command line and ini files give them
    "mode": st.sampled_from(opts.MODES), "image": st.just("host"), "hostname": hostname,
    "timeout": st.one_of(positive.map(str), st.sampled_from(["0", "none", "None", "0.0"])),
    "env": env_line, "mounts": mount, "cap_add": cap, "system_paths": st.sampled_from(["masked", "unconfined"]),
    "seccomp": st.sampled_from(["default", "unconfined", "profile.json", "./sub/../profile.json"]),
    "landlock": st.sampled_from(["on", "off", "yes", "0"]) | st.lists(abs_path, min_size=1, max_size=3).map(",".join),
    "memory": size(4, 4096), "memory_swap": size(1, 4096) | st.just("-1"), "cpus": cpus.map(str),
    "pids": st.integers(2, 10**6).map(str), "ulimits": ulimit, "limits": st.sampled_from(["strict", "best-effort"]),
    "capture_limit": size(1, 1024),
    "python": st.sampled_from(["auto", "/usr/bin/python3", "/usr/local/bin/python3.12"]),
    "allow": st.tuples(st.sampled_from(["127.0.0.1", "[::1]", "localhost", "10.1.2.3"]), st.integers(1, 65535),
                       st.sampled_from(["", "/tcp", "/udp"])).map(lambda t: f"{t[0]}:{t[1]}{t[2]}"),
    "outbound": st.sampled_from(["yes", "no", "true", "false", "on", "off", "1", "0"]),
    "netem": st.sampled_from(["delay=50ms", "loss=2%", "rate=1mbit", "delay=1s", "rate=500kbit"]),
    "network": st.sampled_from(["none", "backend"]) | st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,12}", fullmatch=True),
    "flake": st.integers(1, 3).map(str),  # runs of the inner test: few, the runs are real
}
VALID = {**VALID_TEXT,  # and what a marker can give too
         "timeout": st.one_of(st.none(), st.just(0), positive, VALID_TEXT["timeout"]),
         "env": st.dictionaries(env_key, st.text(line) | st.integers(), max_size=3) | st.lists(env_line, max_size=3),
         "mounts": mount | st.lists(mount, max_size=3),
         "cap_add": cap | st.lists(cap, max_size=4) | st.lists(cap, max_size=4).map(", ".join),
         "landlock": st.one_of(VALID_TEXT["landlock"], st.booleans(), st.none(), st.lists(abs_path, max_size=3)),
         "memory": VALID_TEXT["memory"] | st.none() | st.integers(4 << 20, 1 << 40),
         "memory_swap": VALID_TEXT["memory_swap"] | st.none() | st.integers(1, 1 << 40) | st.just(-1),
         "cpus": st.none() | cpus | cpus.map(str), "pids": st.none() | st.integers(2, 10**6) | VALID_TEXT["pids"],
         "capture_limit": VALID_TEXT["capture_limit"] | st.none() | st.integers(4096, 1 << 30),
         "flake": VALID_TEXT["flake"] | st.integers(1, 3),
         "ulimits": ulimit | st.lists(ulimit, max_size=3) | st.dictionaries(st.sampled_from(opts.RLIMITS),
                                                                            limit | soft_hard, max_size=3)}


# -- the verdict, the shapes, the known bugs ------------------------------------------

def verdict(name: str, value, base: str):
    """(True, parsed value) or (False, the OptionError's message); anything else raises."""
    try:
        return True, opts.BY_NAME[name].parse(value, base)
    except opts.OptionError as exc:
        return False, str(exc)


def acceptable(name: str, value, base: str) -> bool:
    """Whether a run with only this option set may start: the value parses, and
    fits with the defaults of the others (memory_swap alone needs memory)."""
    ok, got = verdict(name, value, base)
    return ok and opts.merge([{name: got}]).problem() is None


def check_shape(name: str, got) -> None:
    if name == "image":  # a normalised reference: it parses to itself
        from pytest_isolate.oci import reference

        assert str(reference.parse(got)) == got
        return
    choices = {"mode": opts.MODES, "system_paths": ("masked", "unconfined"),
               "limits": ("strict", "best-effort")}
    if name in choices:
        assert got in choices[name]
    elif name == "timeout":
        assert got is None or (type(got) is float and 0 < got < math.inf)
    elif name == "hostname":
        assert HOSTNAME.fullmatch(got) and len(got) <= 64
    elif name == "env":
        assert isinstance(got, tuple) and len(dict(got)) == len(got)
        assert all(type(k) is str and type(v) is str and k and "=" not in k and "\0" not in k + v for k, v in got)
    elif name == "mounts":
        for m in got:
            assert isinstance(m, opts.Mount) and isinstance(m.readonly, bool) and os.path.exists(m.src)
            assert m.dst.startswith("/") and not m.dst.startswith("//") and "\0" not in m.dst
            assert os.path.isabs(m.src) and posixpath.normpath(m.dst) == m.dst != "/"
            assert not any(m.dst == r or m.dst.startswith(r + "/") for r in opts._RESERVED_DESTINATIONS)
    elif name == "seccomp":
        assert got in ("default", "unconfined") or os.path.isfile(got)
    elif name == "cap_add":
        assert isinstance(got, tuple) and len(set(got)) == len(got) and all(c in NUMBERS for c in got)
    elif name == "landlock":
        assert got is None or isinstance(got, tuple)
        assert all(p.startswith("/") and "\0" not in p and posixpath.normpath(p) == p for p in got or ())
    elif name in ("memory", "memory_swap", "pids"):
        low, high = {"memory": (4 << 20, 2**63), "memory_swap": (1, 2**63), "pids": (2, PID_MAX_LIMIT + 1)}[name]
        assert got is None or (type(got) is int and (low <= got < high or (name == "memory_swap" and got == -1)))
    elif name == "cpus":
        assert got is None or (type(got) is float and 0.01 <= got < 1e6)
    elif name == "capture_limit":
        assert type(got) is int and 4096 <= got <= 1 << 30
    elif name == "allow":
        assert isinstance(got, tuple) and len(set(got)) == len(got) <= 14
        assert all(proto in ("tcp", "udp") and 0 < port < 65536 for _, port, proto, _ in got)
    elif name == "outbound":
        assert got in (True, False)
    elif name == "flake":
        assert type(got) is int and 1 <= got <= opts.MAX_FLAKE_RUNS
    elif name == "netem":
        assert isinstance(got, tuple) and all(k in ("delay", "jitter", "loss", "rate") for k, _ in got)
    elif name == "network":
        assert got == "none" or (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", got) and got != "host")
    elif name == "python":
        assert got == "auto" or (got.startswith("/") and posixpath.normpath(got) == got)
    elif name == "ulimits":
        assert isinstance(got, tuple) and len({u[0] for u in got}) == len(got)
        for rlimit, soft, hard in got:
            assert rlimit in opts.RLIMITS and type(soft) is int and type(hard) is int and -1 <= soft < 2**63
            assert hard == -1 or 0 <= soft <= hard < 2**63


def unparse(name: str, got):
    """A raw value that should parse back to ``got``."""
    if name == "env":
        return dict(got)
    if name == "mounts":
        return [f"{m.src}:{m.dst}:{'ro' if m.readonly else 'rw'}" for m in got]
    if name == "ulimits":
        return {rlimit: (soft, hard) for rlimit, soft, hard in got}
    if name == "netem":
        units = {"delay": "us", "jitter": "us", "loss": "%", "rate": "bit"}
        return {key: f"{number!r}{units[key]}" for key, number in got}
    if name == "allow":
        return [f"[{host}]:{port}/{proto}" if ":" in host else f"{host}:{port}/{proto}" for host, port, proto, _ in got]
    return list(got) if isinstance(got, tuple) else got


def walk(value):
    yield value
    if isinstance(value, (list, tuple, dict)):
        for v in (value if not isinstance(value, dict) else [*value.keys(), *value.values()]):
            yield from walk(v)


# -- 1. unit level -------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_parse_accepts_in_shape_or_explains(name, data, base) -> None:
    value = data.draw(st.one_of(anything, VALID[name]), label="value")
    ok, got = verdict(name, value, base)
    if ok:
        check_shape(name, got)
    else:
        assert any(word in got for word in EXPLAINS), got


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_valid_values_are_accepted_and_round_trip(name, data, base) -> None:
    value = data.draw(VALID[name], label="value")
    ok, got = verdict(name, value, base)
    assert ok, got
    check_shape(name, got)
    assert verdict(name, unparse(name, got), base) == (True, got)
    if name == "timeout" and not isinstance(value, str) and value:
        assert got == float(value) == opts.parse_timeout(str(value), base)
    elif name == "timeout":
        assert got == (float(value) if value and value.lower() != "none" and float(value) else None)
    elif name in ("mode", "image", "hostname", "system_paths", "python"):
        assert got == value
    elif name == "env" and isinstance(value, dict):
        assert got == tuple((k, str(v)) for k, v in value.items())
    elif name == "mounts":
        specs = [s.split(":") for s in ([value] if isinstance(value, str) else value)]
        assert [(m.src, m.dst, m.readonly) for m in got] == [
            (os.path.realpath(os.path.join(base, s[0])), s[1], s[2:] != ["rw"]) for s in specs]
    elif name == "seccomp" and value not in ("default", "unconfined"):
        assert got == os.path.realpath(os.path.join(base, "profile.json"))


SYSCALLS = st.sampled_from(["read", "write", "getpid", "ioctl", "no_such_call"])
leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6), SYSCALLS)
json_any = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                        max_leaves=6)
ACTIONS = st.sampled_from(["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_LOG", "SCMP_ACT_NOPE"])
u64 = st.integers(0, 2**64 - 1) | json_any
ARG = st.fixed_dictionaries({}, optional={"op": st.sampled_from(["SCMP_CMP_EQ", "SCMP_CMP_MASKED_EQ", "EQ"]) | json_any,
                                          "index": st.integers(0, 5) | json_any, "value": u64, "valueTwo": u64})
FILTER = st.fixed_dictionaries({}, optional={"caps": st.lists(st.sampled_from(sorted(NUMBERS))) | json_any,
                                             "arches": st.lists(st.sampled_from(["amd64", "arm64"])) | json_any})
RULE = st.fixed_dictionaries({}, optional={
    "names": st.lists(SYSCALLS | leaf, max_size=3) | json_any, "action": ACTIONS | json_any,
    "errnoRet": st.integers(0, 4095) | json_any, "args": st.lists(ARG | json_any, max_size=3) | json_any,
    "includes": FILTER | json_any, "excludes": FILTER | json_any})
PROFILES = json_any | st.fixed_dictionaries({}, optional={
    "defaultAction": ACTIONS | json_any, "defaultErrnoRet": st.integers(0, 4095) | json_any,
    "syscalls": st.lists(RULE | json_any, max_size=4) | json_any})


@FAST
@given(profile=PROFILES)
def test_seccomp_profiles_compile_or_explain(profile, base) -> None:
    path = os.path.join(base, "fuzz.json")
    with open(path, "w") as f:
        json.dump(profile, f)
    ok, got = verdict("seccomp", "fuzz.json", base)
    assert got == path if ok else repr(path) in got


# -- 2. merge ------------------------------------------------------------------------

SCALARS = ("mode", "timeout", "hostname", "seccomp", "cap_add", "landlock", "system_paths", "memory", "cpus",
           "limits")
LAYER = st.fixed_dictionaries({}, optional={
    "mode": st.sampled_from(opts.MODES), "timeout": st.none() | st.floats(0.1, 100), "hostname": hostname,
    "seccomp": st.sampled_from(["default", "unconfined"]), "system_paths": st.sampled_from(["masked", "unconfined"]),
    "cap_add": st.lists(st.sampled_from(sorted(NUMBERS)), max_size=3, unique=True).map(tuple),
    "landlock": st.none() | st.lists(abs_path, max_size=2).map(tuple),
    "env": st.dictionaries(st.sampled_from("ABC"), st.text(max_size=3), max_size=3).map(lambda d: tuple(d.items())),
    "mounts": st.lists(st.builds(opts.Mount, st.sampled_from(["/a", "/b"]), st.sampled_from(["/mnt/x", "/mnt/y"]),
                                 st.booleans()), max_size=3).map(tuple),
    "memory": st.none() | st.integers(4 << 20, 1 << 30), "cpus": st.none() | st.floats(0.01, 64),
    "limits": st.sampled_from(["strict", "best-effort"]),
    "ulimits": st.dictionaries(st.sampled_from(["nofile", "core"]), st.integers(0, 9), max_size=2).map(
        lambda d: tuple((k, v, v) for k, v in d.items()))})


@FAST
@given(ini=LAYER, cli=LAYER, markers=st.lists(LAYER, max_size=3))
def test_merge_later_layers_win(ini, cli, markers) -> None:
    layers = [ini, cli, *markers]
    merged, default = opts.merge(layers), opts.Settings()
    for name in SCALARS:
        having = [layer[name] for layer in layers if name in layer]
        assert getattr(merged, name) == (having[-1] if having else getattr(default, name))
    env, mounts, ulimits = {}, {}, {}
    for layer in layers:
        env.update(layer.get("env", ()))
        mounts.update((m.dst, m) for m in layer.get("mounts", ()))
        ulimits.update((u[0], u) for u in layer.get("ulimits", ()))
    assert dict(merged.env) == env and len(merged.env) == len(env)
    assert {u[0]: u for u in merged.ulimits} == ulimits and len(merged.ulimits) == len(ulimits)
    assert {m.dst: m for m in merged.mounts} == mounts and len(merged.mounts) == len(mounts)


@FAST
@given(layers=st.lists(LAYER, max_size=4), extra=LAYER, position=st.integers(0, 4))
def test_merge_ignores_unrelated_layers(layers, extra, position) -> None:
    before = opts.merge(layers)
    after = opts.merge(layers[:position] + [extra] + layers[position:])
    for name in set(SCALARS) - set(extra):
        assert getattr(after, name) == getattr(before, name)
    keys, dsts = dict(extra.get("env", ())), {m.dst for m in extra.get("mounts", ())}
    rlimits = {u[0] for u in extra.get("ulimits", ())}
    assert [u for u in after.ulimits if u[0] not in rlimits] == [u for u in before.ulimits if u[0] not in rlimits]
    assert [kv for kv in after.env if kv[0] not in keys] == [kv for kv in before.env if kv[0] not in keys]
    assert [m for m in after.mounts if m.dst not in dsts] == [m for m in before.mounts if m.dst not in dsts]


# -- 3. end to end -------------------------------------------------------------------

TEST_FILE = "import pytest\n\n@pytest.mark.isolated({args})\ndef test_a():\n    pass\n"
NODE = "test_fz.py::test_a"


def source(value) -> str:
    """Python source that evaluates to ``value`` (nan and inf included)."""
    if isinstance(value, float):
        return f"float({repr(value)!r})"
    if isinstance(value, (list, tuple)):
        inner = "".join(source(v) + ", " for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{source(k)}: {source(v)}" for k, v in value.items()) + "}"
    return ascii(value)


def check_run(result: pytest.RunResult, ok: bool, *fragments: str) -> None:
    """ok: no usage nor internal error; else exit 4, no traceback, an ERROR: line with every fragment."""
    output = "\n".join(result.outlines + result.errlines)
    assert "INTERNALERROR" not in output, output
    if ok:
        assert result.ret not in (3, 4), output
        return
    assert result.ret == 4 and "Traceback" not in output, output
    assert any(ln.startswith("ERROR:") and all(f in ln for f in fragments) for ln in output.splitlines()), output


@E2E
@given(data=st.data())
def test_marker_values(pytester, run, data) -> None:
    name = data.draw(st.sampled_from(NAMES), label="name")
    value = data.draw(st.one_of(anything, VALID[name]), label="value")
    pytester.makepyfile(test_fz=TEST_FILE.format(args=f"{name}={source(value)}"))
    ok = acceptable(name, value, populate(pytester.path))
    check_run(run(timeout=60), ok, NODE, repr(name))


@E2E
@given(data=st.data())
def test_command_line_values(pytester, run, data) -> None:
    option = opts.BY_NAME[data.draw(st.sampled_from(NAMES), label="name")]
    text = data.draw(VALID_TEXT[option.name] | cli_text, label="text")
    pytester.makepyfile(test_fz=TEST_FILE.format(args=""))
    ok = acceptable(option.name, [text] if option.multiple else text, populate(pytester.path))
    check_run(run(f"{option.flag}={text}", timeout=60), ok, option.flag, repr(option.name))


@E2E
@given(data=st.data())
def test_ini_values(pytester, run, data) -> None:
    option = opts.BY_NAME[data.draw(st.sampled_from(NAMES), label="name")]
    text = data.draw(VALID_TEXT[option.name] | ini_text, label="text")
    ini = pytester.path / "pytest.ini"
    ini.write_text(f"[pytest]\n{option.ini} = {text}\n", encoding="utf-8")
    value = iniconfig.IniConfig(str(ini))["pytest"][option.ini]  # as pytest reads it
    if option.multiple:
        value = [part.strip() for part in value.split("\n") if part.strip()]
    pytester.makepyfile(test_fz=TEST_FILE.format(args=""))
    ok = value in ("", []) or acceptable(option.name, value, populate(pytester.path))
    check_run(run(timeout=60), ok, option.ini, repr(option.name))


@settings(E2E, max_examples=6)
@given(key=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(
    lambda k: k not in opts.BY_NAME and not keyword.iskeyword(k) and k != "__debug__"), value=scalars)
def test_unknown_marker_keywords(pytester, run, key, value) -> None:
    pytester.makepyfile(test_fz=TEST_FILE.format(args=f"{key}={source(value)}"))
    check_run(run(timeout=60), False, NODE, f"unknown keyword {key!r}", "accepted: " + ", ".join(opts.BY_NAME))


@settings(E2E, max_examples=5)
@given(args=st.lists(scalars, min_size=1, max_size=3), mode=st.sampled_from(["", ", mode='fork'"]))
def test_positional_marker_args(pytester, run, args, mode) -> None:
    pytester.makepyfile(test_fz=TEST_FILE.format(args=", ".join(map(source, args)) + mode))
    check_run(run(timeout=60), False, NODE, "keyword options only", "accepted keywords: mode")


# -- regressions: inputs that once crashed or slipped through --------------------------

def bug(first: str, second: str, reason: str):
    """A bug the fuzzers found, fixed since: kept as a regression case."""
    return pytest.param(first, second, id=f"{first}={second}"[:60])


BUGS = [  # option, marker value (source), what went wrong before the fix
    bug("timeout", "10**400", "options.py:79 float(value) raises OverflowError, not caught: INTERNALERROR"),
    bug("mode", "10**5000", "options.py:61 (every f'got {value!r}'): repr of an int > 4300 digits raises"),
    bug("env", "{'A': 10**5000}", "options.py:118 str(val) raises ValueError for an int of > 4300 digits"),
    bug("mounts", "'/t\\0mp:/mnt/x'", "options.py:143 os.path.realpath raises ValueError (embedded null byte)"),
    bug("seccomp", "'prof\\0ile.json'", "options.py:164 os.path.realpath raises ValueError (embedded null byte)"),
    bug("mounts", "'.:/mnt/a\\0b'", "options.py:148 a NUL in the destination is accepted"),
    bug("landlock", "['/tmp/a\\0b']", "options.py:223 a NUL in a landlock path is accepted"),
    bug("mounts", "'.://proc'", "options.py:148 normpath keeps a leading '//', so //proc passes the reserved check"),
    bug("mounts", "'.://'", "options.py:149 '//' (the root) passes the dst == '/' check"),
    bug("hostname", "'abc\\n'", "options.py:90 _HOSTNAME.match: '$' matches before a trailing newline"),
    bug("memory", "'9' * 400 + 'm'", "options.py:255 int(float(number) * unit) raises OverflowError"),
    bug("memory", "2**64", "options.py:260 accepted; the cgroup write fails at run time: [Errno 22]"),
    bug("cpus", "10**400", "options.py:288 float(value) raises OverflowError, not caught"),
    bug("pids", "'\\u00b2'", "options.py:300 '²'.isdigit() is True, then int('²') raises ValueError"),
    bug("pids", "5000000", "options.py:305 above PID_MAX_LIMIT (4194304): pids.max refuses it at run time"),
    bug("ulimits", "{'nofile': float('inf')}", "options.py:336 int(inf) raises OverflowError, not caught"),
    bug("ulimits", "{'nofile': 2**70}", "options.py:336 > 2**63-1 accepted; the container then fails to start"),
]


@pytest.mark.parametrize("name, src", BUGS)
def test_former_bugs(pytester, run, name, src) -> None:
    ok, got = verdict(name, eval(src), str(pytester.path))
    assert not ok and any(word in got for word in EXPLAINS), got
    pytester.makepyfile(test_fz=TEST_FILE.format(args=f"{name}={src}"))
    check_run(run(timeout=60), False, NODE, repr(name))


BAD_PROFILES = [  # profile text, what went wrong before the fix
    bug("1", '{"syscalls": [1]}', "seccomp.py:90 AttributeError: a rule that is not an object"),
    bug("2", '{"syscalls": [{"names": [1]}]}', "seccomp.py:129 AttributeError: a name that is not a string"),
    bug("3", '{"syscalls": [{"names": ["read"], "args": [1]}]}', "seccomp.py:124 AttributeError: arg not an object"),
    bug("4", '{"syscalls": [{"names": ["read"], "includes": "x"}]}', "seccomp.py:91 AttributeError: includes a str"),
    bug("5", '{"defaultErrnoRet": 1e400}', "seccomp.py:105 int(inf) raises OverflowError"),
    bug("6", "[" * 100000 + "]" * 100000, "options.py:167 json.load raises RecursionError"),
    bug("7", '{"syscalls": [{"names": "read"}]}', "seccomp.py:128 names as a string is accepted (letter by letter)"),
    bug("8", '{"syscalls": [{"names": ["read"], "args": [{"op": "SCMP_CMP_EQ", "index": 1099511627776, "value": 1}]}]}',
        "seccomp.py:126 an arg index of 2**40 is accepted (ctypes truncates it to 0)"),
    bug("9", '{"syscalls": [{"names": ["read"], "args": [{"op": "SCMP_CMP_EQ", "index": 0, "value": -1}]}]}',
        "seccomp.py:126 a negative value is accepted (ctypes wraps it to 2**64-1)"),
    bug("10", '{"defaultErrnoRet": 1000000}', "seccomp.py:78 an errno > 4095 is accepted (masked with 0xFFFF)"),
    bug("11", '{"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1.5}]}',
        "the message is Python's 'unsupported operand type(s) for &', nothing of what is accepted"),
    bug("12", '{"syscalls": [{"names": ["read"], "args": [{"op": "EQ", "index": 0, "value": 1}]}]}',
        "seccomp.py:125 the message does not list the accepted comparisons"),
]


@pytest.mark.parametrize("number, text", BAD_PROFILES)
def test_bad_profiles_are_usage_errors(number, text, tmp_path) -> None:
    (tmp_path / "p.json").write_text(text)
    ok, got = verdict("seccomp", "p.json", str(tmp_path))
    assert not ok and "accepted" in got, got
