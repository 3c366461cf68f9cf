"""The pytest side: options, the ``isolated`` marker, and the hooks that hand tests to
container hosts (``controller.py``) and replay what comes back."""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import warnings
from typing import Any

import pytest

from . import flake, limits, services, shared_support
from . import options as opts
from .container_info import isolated_container  # noqa: F401 - the fixture, for every test

MARKER = "isolated"
settings_key = pytest.StashKey[opts.Settings]()
services_key = pytest.StashKey[list]()  # the services a test uses (services.specs_for)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolate", "run tests in containers (pytest-isolate)")
    group.addoption("--isolate", action="store_true", default=None,
                    help="run every test in a fresh container, as if marked "
                    "@pytest.mark.isolated")
    parser.addini("isolate", type="bool", default=False,
                  help="run every test in a fresh container, as if marked @pytest.mark.isolated "
                  "(like --isolate)")
    group.addoption("--isolate-usage", type=int, default=None, metavar="N",
                    help="list the N isolated tests that used the most memory and CPU "
                    "(default: 5 with -v or when a test hit a limit, else none; 0: none)")
    parser.addini(shared_support.INI, type="linelist", default=[], help=shared_support.HELP)
    group.addoption("--isolate-pull", dest="isolate_pull", metavar="missing|always|never", default=None,
                    help="when to read an image into the image store: missing (default), always, never "
                    "(as Docker's --pull)")
    parser.addini("isolate_pull", default=None, help="like --isolate-pull")
    group.addoption("--isolate-insecure-registry", dest="isolate_insecure_registry", metavar="HOST[:PORT]",
                    action="append", default=None,
                    help="a registry reached over plain http or with an unverified certificate (repeatable; "
                    "loopback registries may use plain http anyway), as Docker's insecure-registries")
    parser.addini("isolate_insecure_registries", type="linelist", default=[],
                  help="registries (HOST[:PORT], one a line) reached over plain http or with an unverified "
                  "certificate, as Docker's insecure-registries (added to those of the command line)")
    group.addoption("--isolate-flake-report", dest="isolate_flake_report", metavar="PATH", default=None,
                    help="write each test's runs, failures, rate, interval and verdict of --isolate-flake as JSON")
    parser.addini("isolate_flake_report", default=None, help="like --isolate-flake-report")
    group.addoption("--isolate-flake-stop-early", dest="isolate_flake_stop_early", action="store_true",
                    default=None, help="with --isolate-flake: stop a test's runs once it both passed and failed "
                    "(flaky: the verdict cannot change)")
    for option in opts.OPTIONS:
        group.addoption(option.flag, dest=f"isolate_{option.name}", metavar=option.metavar,
                        action="append" if option.multiple else "store", default=None,
                        help=option.help)
        parser.addini(option.ini, help=option.help, type="linelist" if option.multiple else "string",
                      default=[] if option.multiple else None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**options): run this test in a fresh container. Options: "
        + ", ".join(o.name for o in opts.OPTIONS) + "; each is also a flag --isolate-OPTION ('_' as '-'; "
        + ", ".join(f"{o.name}: {o.flag}" for o in opts.OPTIONS if o.flag != "--isolate-" + o.name.replace("_", "-"))
        + "), listed in `pytest --help` under \"run tests in containers (pytest-isolate)\", "
        "and an ini key isolate_OPTION.",
    )
    workerinput = getattr(config, "workerinput", {})
    if workerinput.get("isolate_host"):
        return  # inside a container host: tests already run in containers here
    from .controller import Controller

    config.pluginmanager.register(IsolatePlugin(config, Controller(config)), "isolate-controller")


class IsolatePlugin:
    def __init__(self, config: pytest.Config, controller) -> None:
        self.config = config
        self.controller = controller
        self.base_layers = [self._ini_layer(), self._cli_layer()]
        # --isolate-flake=N (or its ini key) runs every test N times, each in a fresh container.
        flaky_run = any(layer.get("flake", 1) > 1 for layer in self.base_layers)
        self.isolate_all = bool(config.getoption("isolate") or self._ini_switch() or flaky_run)
        self.flakes = flake.Summary()
        controller.pull_policy = self._pull_policy()
        controller.insecure_registries = self._insecure_registries()
        self.isolated_count = 0
        self.worker_lines: list[str] = []
        self.teardown_errors: list[str] = []  # of shared fixtures, also from xdist workers

    # -- option layers -----------------------------------------------------------------

    def _ini_switch(self) -> bool:
        try:
            return bool(self.config.getini("isolate"))
        except (ValueError, pytest.UsageError) as exc:  # pytest 9 raises UsageError itself
            raise pytest.UsageError(
                f"ini key isolate {self._ini_source()}: {exc}; accepted: true or false"
            ) from None

    def _pull_policy(self) -> str:
        value = self.config.getoption("isolate_pull")
        where = "command line --isolate-pull"
        if value is None:
            value, where = self.config.getini("isolate_pull"), f"ini key isolate_pull {self._ini_source()}"
        if value in (None, ""):
            return "missing"
        if value not in opts.PULL_POLICIES:
            raise pytest.UsageError(f"{where}: got {value!r}; accepted: {', '.join(map(repr, opts.PULL_POLICIES))}")
        return value

    def _insecure_registries(self) -> tuple[str, ...]:
        given = [(v, f"ini key isolate_insecure_registries {self._ini_source()}")
                 for v in self.config.getini("isolate_insecure_registries") or []]
        given += [(v, "command line --isolate-insecure-registry")
                  for v in self.config.getoption("isolate_insecure_registry") or []]
        from .oci import reference

        names = []
        for value, where in given:
            try:
                names.append(reference.parse_registry_host(value))
            except reference.ReferenceError as exc:
                raise pytest.UsageError(f"{where}: {exc}") from None
        return tuple(names)

    def _ini_source(self) -> str:
        inipath = self.config.inipath
        return f"in {inipath}" if inipath else "(given with -o: there is no ini file)"

    def _parse(self, option: opts.Option, value: Any, base: str, where: str) -> Any:
        try:
            return option.parse(value, base)
        except opts.OptionError as exc:
            raise pytest.UsageError(f"{where}: invalid {option.name!r}: {exc}") from None

    def _ini_layer(self) -> dict[str, Any]:
        inipath = self.config.inipath
        base = str(inipath.parent) if inipath else str(self.config.rootpath)
        layer = {}
        for option in opts.OPTIONS:
            value = self.config.getini(option.ini)
            if value not in (None, [], ""):
                layer[option.name] = self._parse(option, value, base, f"ini key {option.ini} {self._ini_source()}")
        return layer

    def _cli_layer(self) -> dict[str, Any]:
        base = str(self.config.invocation_params.dir)
        layer = {}
        for option in opts.OPTIONS:
            value = self.config.getoption(f"isolate_{option.name}")
            if value is not None:
                layer[option.name] = self._parse(option, value, base, f"command line {option.flag}")
        return layer

    def _source_of(self, name: str, marker_layers: list[dict[str, Any]]) -> str:
        """Where the value of option ``name`` that a test got was set (the last layer wins)."""
        option = opts.BY_NAME[name]
        sources = [f"ini key {option.ini}", f"command line {option.flag}"]
        sources += [f"@pytest.mark.{MARKER}"] * len(marker_layers)
        found = [where for layer, where in zip(self.base_layers + marker_layers, sources) if name in layer]
        return found[-1] if found else "its default"

    def _registered_markers(self) -> set[str]:
        return {line.split(":")[0].split("(")[0].strip() for line in self.config.getini("markers")}

    def _check_marker_names(self, item: pytest.Item, registered: set[str]) -> None:
        """A marker that is not registered and reads like ours (``isolate``, ``isloated``)
        is a typo that would run the test unisolated: an error, not pytest's warning."""
        for marker in item.iter_markers():
            if marker.name != MARKER and marker.name not in registered and _did_you_mean(marker.name, [MARKER]):
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{marker.name} is not a marker of pytest-isolate"
                                        f"{_did_you_mean(marker.name, [MARKER])}")

    def _marker_layers(self, item: pytest.Item) -> list[dict[str, Any]] | None:
        markers = list(item.iter_markers(MARKER))
        if not markers and not self.isolate_all:
            return None
        base = os.path.dirname(str(item.path))
        layers = []
        for marker in reversed(markers):  # the closest marker (the function's) wins
            where = f"{item.nodeid}: @pytest.mark.{MARKER}"
            if marker.args:
                raise pytest.UsageError(
                    f"{where} takes keyword options only, got positional {marker.args!r}; "
                    f"accepted keywords: {', '.join(opts.BY_NAME)}"
                )
            layer = {}
            for key, value in marker.kwargs.items():
                option = opts.BY_NAME.get(key)
                if option is None:
                    raise pytest.UsageError(
                        f"{where} got an unknown keyword {key!r}{_did_you_mean(str(key), opts.BY_NAME)}; "
                        f"accepted: {', '.join(opts.BY_NAME)}"
                    )
                layer[key] = self._parse(option, value, base, where)
            layers.append(layer)
        return layers

    # -- hooks -----------------------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        isolated = []
        registered = self._registered_markers()
        for item in items:
            self._check_marker_names(item, registered)
            layers = self._marker_layers(item)
            if layers is not None:
                settings = opts.merge(self.base_layers + layers)
                wanted = item.stash[services_key] = services.specs_for(item)
                if wanted and settings.network == "none":  # a test that uses a service reaches it
                    settings = dataclasses.replace(settings, network=services.DEFAULT_NETWORK)
                item.stash[settings_key] = settings
                problem = settings.problem()
                if problem:
                    raise pytest.UsageError(f"{item.nodeid}: invalid {problem[0]!r} (from "
                                            f"{self._source_of(problem[0], layers)}): {problem[1]}")
                isolated.append(item)
        self.isolated_count = len(isolated)
        planned = [(item, item.stash[settings_key]) for item in isolated]
        self.controller.plan(planned)
        shared = self.config.getini(shared_support.INI)
        if shared:
            self.controller.plan_shared(shared_support.check_names(shared, session, items, self._ini_source()), planned)
        if isolated and (self.config.getoption("usepdb") or self.config.getoption("trace")):
            warnings.warn(pytest.PytestWarning(
                "--pdb/--trace do not stop in isolated tests: containers have no terminal. "
                "Run the test without isolation (-p no:isolate) to debug it."
            ))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        settings = item.stash.get(settings_key, None)
        if settings is None:
            return None
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        if settings.flake > 1:
            flake.run(self.controller, item, nextitem, settings, item.stash.get(services_key, []),
                      bool(self.config.getoption("isolate_flake_stop_early")))
        else:
            self.controller.run(item, nextitem, settings, item.stash.get(services_key, []))
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def pytest_report_header(self, config: pytest.Config) -> str | None:
        if not self.isolate_all:
            return None
        who = "rootless" if os.geteuid() != 0 else "as root; container root is an unprivileged uid"
        return f"isolate: every test in a container ({who})"

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        """Under xdist, the controller prints what each worker's hosts did."""
        output = getattr(node, "workeroutput", None) or {}
        worker = getattr(getattr(node, "gateway", None), "id", "?")
        self.worker_lines += [f"[{worker}] {line}" for line in output.get("isolate_summary", [])]
        self.controller.usages += [tuple(usage) for usage in output.get("isolate_usages", [])]
        self.teardown_errors += [f"[{worker}] {error}" for error in output.get("isolate_teardown_errors", [])]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.flakes.logreport(report)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.flakes.tests:
            terminalreporter.write_sep("-", "pytest-isolate: flakiness (failed runs, 95% interval, verdict)")
            for line in self.flakes.lines():
                terminalreporter.write_line(line)
        lines = self.controller.summary_lines() + self.worker_lines
        if lines:
            terminalreporter.write_sep("-", "pytest-isolate")
            for line in lines:
                terminalreporter.write_line(line)
        count = self.config.getoption("isolate_usage")
        if count is None:  # by default only when it tells something
            count = 5 if limits.limit_hit(self.controller.usages) or self.config.get_verbosity() >= 1 else 0
        for error in self.teardown_errors:
            terminalreporter.write_sep("_", "pytest-isolate: ERROR at teardown of the shared fixtures", red=True)
            terminalreporter.write_line(error)
        top = limits.top_consumers(self.controller.usages, count)
        if top:
            terminalreporter.write_sep("-", "pytest-isolate: top consumers")
            for line in top:
                terminalreporter.write_line(line)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.controller.shutdown()
        self.teardown_errors += self.controller.teardown_errors
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: hand the summary to the controller
            workeroutput["isolate_summary"] = self.controller.summary_lines()
            workeroutput["isolate_usages"] = [list(usage) for usage in self.controller.usages]
            workeroutput["isolate_teardown_errors"] = list(self.controller.teardown_errors)
        report_path = self.config.getoption("isolate_flake_report") or self.config.getini("isolate_flake_report")
        if report_path and workeroutput is None:  # xdist's controller writes it for all workers
            try:
                self.flakes.write(os.path.join(str(self.config.invocation_params.dir), report_path))
            except OSError as exc:
                sys.stderr.write(f"ERROR: --isolate-flake-report: cannot write {report_path}: {exc.strerror}\n")
                session.exitstatus = pytest.ExitCode.USAGE_ERROR
        # A shared fixture's teardown error fails the run, as a session fixture's does.
        if self.teardown_errors and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""
