"""Inside a test's container: measure the test's coverage and send it as an event.

The controller's side, and why it is done this way, is coverage_support.py. Like
reporter.py this imports nothing of the plugin; coverage itself only when the
controller measures (its settings are in the host's ``workerinput``).

The test's process starts a Coverage with the controller's configuration, its data
file in a directory of the container's /tmp, right before pytest's run protocol,
and stops it after the teardown. Subprocesses (``[run] patch = subprocess``) write
theirs there too; whatever ran is combined, and the lines (or arcs) are sent by
context and file as one ``coverage`` event.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import pytest

SETTINGS_KEY = "isolate_coverage"  # as coverage_support.SETTINGS_KEY
# Coverage data larger than this is left out (with a warning), well within the
# events cap of a test.
CAP = 16 << 20


def prepare(workerinput: dict) -> None:
    """In the container host: import coverage once, so that forked tests share it."""
    if workerinput.get(SETTINGS_KEY):
        try:
            import coverage  # noqa: F401
            import coverage.config  # noqa: F401
        except ImportError:
            pass


def start(config: pytest.Config, item: pytest.Item, send):
    """A running Measurement of this test, or None when the controller measures nothing."""
    settings = (getattr(config, "workerinput", None) or {}).get(SETTINGS_KEY)
    if not settings:
        return None
    try:
        return Measurement(config, item, settings, send)
    except Exception as exc:  # noqa: BLE001 - the test still runs, unmeasured
        _warn(send, item, f"coverage could not start in the container ({_describe(exc)})")
        return None


class Measurement:
    """One test's Coverage, with pytest-cov's per-test contexts and no_cover."""

    def __init__(self, config: pytest.Config, item: pytest.Item, settings: dict, send) -> None:
        import coverage
        from coverage.config import CoverageConfig

        self.item = item
        self.send = send
        self.settings = settings
        self.directory = tempfile.mkdtemp(prefix="pytest-isolate-coverage-")
        self._data_dir = os.path.join(self.directory, "data")
        os.mkdir(self._data_dir)
        measured = CoverageConfig.deserialize(settings["config"])
        measured.data_file = os.path.join(self._data_dir, ".coverage")
        measured.parallel = True  # a file per process: this one's and its subprocesses'
        self.config_text = measured.serialize()
        _skip_origin_stack()
        self.cov = coverage.Coverage(config_file=":data:" + self.config_text)
        # The test's modules were imported before it started (at collection):
        # nothing to warn about, the controller measured that.
        for name in ("_warn_no_data", "_warn_unimported_source", "_warn_preimported_source"):
            setattr(self.cov, name, False)
        self.config = config
        config.pluginmanager.register(self, "isolate-coverage")
        self.cov.start()
        if settings["subprocesses"]:  # coverage's .pth starts measuring in every new interpreter
            os.environ["COVERAGE_PROCESS_CONFIG"] = self.config_text

    # -- pytest-cov's --cov-context=test and no_cover, as its plugin does them --------------

    def _switch(self, item: pytest.Item, when: str) -> None:
        if self.settings["contexts"] and item is self.item:
            self.cov.switch_context(f"{item.nodeid}|{when}")

    @pytest.hookimpl
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self._switch(item, "setup")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        self._switch(item, "run")
        paused = self.settings["pytest_cov"] and bool(
            item.get_closest_marker("no_cover") or "no_cover" in getattr(item, "fixturenames", ()))
        if paused:
            self.cov.stop()
        try:
            return (yield)
        finally:
            if paused:
                self.cov.start()

    @pytest.hookimpl
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        self._switch(item, "teardown")

    # -- the end ------------------------------------------------------------------------------

    def finish(self) -> None:
        """Stop, combine this process's data with its subprocesses', send it."""
        try:
            self.config.pluginmanager.unregister(self)
            self.cov.stop()
            data = self.cov.get_data()  # written into the data directory, as a save() does
            if any(name != os.path.basename(data.data_filename()) for name in os.listdir(self._data_dir)):
                data = self._combined()  # a subprocess wrote data too
            exported = export(data, bool(self.cov.config.branch))
            size = len(json.dumps(exported, separators=(",", ":")))
            if size > CAP:
                _warn(self.send, self.item, f"its coverage data ({size} bytes) is larger than {CAP} bytes "
                      "and was left out")
                return
        except Exception as exc:  # noqa: BLE001 - the test's result stands, unmeasured
            _warn(self.send, self.item, f"its coverage data could not be collected ({_describe(exc)})")
            return
        self.send("coverage", data=exported)

    def _combined(self):
        import coverage
        from coverage.config import CoverageConfig

        combining = CoverageConfig.deserialize(self.config_text)
        combining.data_file = os.path.join(self.directory, ".coverage")
        combining.parallel = False
        cov = coverage.Coverage(config_file=":data:" + combining.serialize())
        cov.combine(data_paths=[self._data_dir], keep=True)
        return cov.get_data()


def _skip_origin_stack() -> None:
    """Coverage's collector notes the stack it was started from (``short_stack()``, for
    its debug output): inspect.stack() reads the source of every frame, pytest's
    deep stack here, which costs tens of ms a test. This process is the test's alone."""
    try:
        import coverage.collector

        if callable(getattr(coverage.collector, "short_stack", None)):
            coverage.collector.short_stack = lambda *args, **kwargs: "(pytest-isolate: a test's process)"
    except Exception:  # noqa: BLE001 - another coverage: only slower
        pass


def export(data, branch: bool) -> dict:
    """A CoverageData as plain JSON: ``{"arcs", "files": {path: {context: numbers}},
    "tracers": {path: plugin}}`` (what coverage_support.check takes), of the kind
    measured (``branch``: arcs): data of a test that ran no measured line is
    neither lines nor arcs. Files with nothing run (coverage touches every file of
    its sources) are left out: the controller's own measurement touches them."""
    arcs = branch
    files: dict[str, dict[str, list]] = {}
    measured = sorted(data.measured_files())
    for context in sorted(data.measured_contexts()):
        data.set_query_contexts(["^" + re.escape(context) + "$"])
        for path in measured:
            numbers = data.arcs(path) if arcs else data.lines(path)
            if numbers:
                files.setdefault(path, {})[context] = sorted(list(n) for n in numbers) if arcs else sorted(numbers)
    data.set_query_contexts(None)
    tracers = {path: tracer for path in files if (tracer := data.file_tracer(path))}
    return {"arcs": arcs, "files": files, "tracers": tracers}


def _warn(send, item: pytest.Item, message: str) -> None:
    """A warning of the test, shown in the controller's warnings summary."""
    send("warning", warning={"message": f"pytest-isolate: {message}", "category_module": "pytest",
                             "category_name": "PytestWarning", "filename": str(item.path), "lineno": _line(item)},
         when="runtest", nodeid=item.nodeid, location=None)


def _line(item: pytest.Item) -> int | None:
    line = item.location[1]
    return line + 1 if isinstance(line, int) else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:500]}" if text else type(exc).__name__
