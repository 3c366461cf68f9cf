"""Coverage of isolated tests, the controller's side (the container's is coverage_container.py).

When coverage.py measures the controller (``pytest --cov=...`` through pytest-cov,
``coverage run -m pytest``, or an xdist worker of either), the lines a test runs in
its container must count too. They come back over the link, never through a
writable mount of the project:

* The container host does not run pytest-cov: its options say ``cov_source=[]``
  (hosts.HOST_OPTION_OVERRIDES), so pytest-cov's plugin never starts there
  (it would write its data file into the read-only project). Coverage's own
  start-up variables (``COVERAGE_PROCESS_START``/``_CONFIG``, pytest-cov's older
  ``COV_CORE_*``) are kept out of the host's environment (``host_environment``),
  so no interpreter of the host measures itself.
* Each host gets, in its ``workerinput``, the controller's coverage configuration
  (``CoverageConfig.serialize()``: source, include/omit, branch, plugins, ...),
  whether pytest-cov switches per-test contexts (``--cov-context=test``) and
  whether subprocesses are measured (``[run] patch = subprocess``, or those
  variables set).
* The test's process measures itself from its setup to its teardown, with its data
  file in the container's ``/tmp``, collects what its subprocesses wrote there, and
  sends the lines (or arcs) it ran, by context and file, as one ``coverage`` event:
  plain JSON numbers. Not coverage's own ``CoverageData.dumps()``: ``loads()`` runs
  the bytes as an SQL script, which is no thing to do with what a hostile test sent
  (an ``ATTACH DATABASE`` writes a file anywhere the controller can).
* The controller checks the event (``check``, within caps; a test that sends a
  malformed one fails with "the test tampered with its report channel") and
  gathers the data of every test in memory. When the run loop ends, before
  pytest-cov saves and combines (or ``coverage run`` saves), it merges them into
  the running Coverage's data (``CoverageData.update``). Under xdist each worker does
  so, and pytest-cov's worker sends its data to the master as usual.

Paths inside a container are the host's (the host image is a read-only view of the
host at the same paths), so nothing is remapped. Collection (module-level lines)
is measured in the controller, which collects the same modules.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import pytest

from . import boundary

# What a host's workerinput carries (coverage_container.py reads it).
SETTINGS_KEY = "isolate_coverage"
# Variables that start coverage in a new interpreter (coverage's .pth file, the
# .pth of pytest-cov < 7): never in a container host's environment.
START_VARIABLES = ("COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG")
START_PREFIXES = ("COV_CORE_",)
# Caps of one test's coverage event (besides the events cap of the whole stream).
MAX_FILES = 1 << 16
MAX_CONTEXTS = 1 << 10
MAX_LINE = 1 << 20  # no source file has a million lines
# What the line bitmaps of one event may take (coverage stores a line set as a bitmap
# as long as its highest line / 8): honest suites use a few hundred KB.
MAX_BITMAP_BYTES = 16 << 20


def running():
    """The Coverage measuring this process now (pytest-cov's, ``coverage run``'s), or None."""
    try:
        import coverage
    except ImportError:
        return None
    try:
        return coverage.Coverage.current()
    except Exception:  # noqa: BLE001 - an old or broken coverage: nothing to measure with
        return None


@contextlib.contextmanager
def host_environment():
    """The controller's environment without coverage's start-up variables, while a
    container host is spawned (it inherits the environment at that moment)."""
    saved = {name: value for name, value in os.environ.items()
             if name in START_VARIABLES or name.startswith(START_PREFIXES)}
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(saved)


class CoverageCollector:
    """The coverage data of this controller's isolated tests, merged at the end of
    the run loop into the Coverage that measures this process."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.settings: dict | None = None  # what containers get; None: not measuring
        self.arcs = False
        self._decided = False
        self._pending = None  # a CoverageData in memory, made on first use
        self.tests = 0

    # -- what the containers get -------------------------------------------------------------

    def container_settings(self) -> dict | None:
        """What a container host is told about coverage (None: nothing is measured).
        Decided when the first host starts: pytest-cov starts measuring in
        ``pytest_sessionstart`` under xdist, later than this plugin is configured."""
        if not self._decided:
            self._decided = True
            self.settings = self._settings()
        return self.settings

    def _settings(self) -> dict | None:
        cov = running()
        if cov is None:
            return None
        try:
            serialized = cov.config.serialize()
        except AttributeError:  # coverage < 7.10 has no serialized configuration
            warnings.warn(pytest.PytestWarning(
                "pytest-isolate: coverage inside containers needs coverage 7.10 or later; "
                "the lines isolated tests run are not measured"))
            return None
        except Exception as exc:  # noqa: BLE001 - a configuration that does not serialize
            warnings.warn(pytest.PytestWarning(
                f"pytest-isolate: the coverage configuration cannot be passed to containers "
                f"({type(exc).__name__}: {exc}); the lines isolated tests run are not measured"))
            return None
        self.arcs = bool(cov.config.branch)
        pytest_cov = self.config.pluginmanager.getplugin("_cov")
        patches = getattr(cov.config, "patch", None) or []
        return {
            "config": serialized,
            # pytest-cov's --cov-context=test: switch contexts per test phase
            "contexts": bool(pytest_cov) and self.config.getoption("cov_context", None) == "test",
            # pytest-cov's no_cover marker and fixture pause the measurement
            "pytest_cov": bool(pytest_cov),
            "subprocesses": "subprocess" in patches or any(os.environ.get(name) for name in START_VARIABLES)
            or any(name.startswith(START_PREFIXES) for name in os.environ),
        }

    # -- what comes back ---------------------------------------------------------------------

    def checker(self):
        """The check for a test's coverage event (Replay.check_coverage), or None when
        nothing is measured: a coverage event is then not expected at all."""
        return self.check if self.settings is not None else None

    def check(self, data: Any) -> dict:
        """A test's coverage event, checked: ``{"arcs": bool, "files": {path:
        {context: [line, ...] or [[from, to], ...]}}, "tracers": {path: plugin}}``."""
        data = boundary.mapping(boundary.mapping(data, "a coverage event").get("data"), "coverage data")
        if set(data) != {"arcs", "files", "tracers"}:
            raise boundary.Tampering("coverage data with unexpected fields")
        if data["arcs"] is not self.arcs:
            raise boundary.Tampering("coverage data that is not of the measured kind (lines or branches)")
        files = boundary.mapping(data["files"], "coverage data's files")
        if len(files) > MAX_FILES:
            raise boundary.Tampering(f"coverage data of more than {MAX_FILES} files")
        bitmaps = 0
        contexts: set[str] = set()
        checked: dict[str, dict[str, list]] = {}
        for path, by_context in files.items():
            _path(path)
            by_context = boundary.mapping(by_context, "coverage data of a file")
            checked[path] = {}
            for context, numbers in by_context.items():
                boundary.text(context, "a coverage context")
                if "\0" in context:
                    raise boundary.Tampering("a coverage context with a NUL")
                contexts.add(context)
                numbers = boundary.sequence(numbers, "coverage numbers")
                if self.arcs:
                    numbers = [(_line(a, -MAX_LINE), _line(b, -MAX_LINE)) for a, b in
                               (boundary.sequence(arc, "an arc", 2) for arc in numbers)]
                else:
                    numbers = [_line(n, 0) for n in numbers]
                    bitmaps += (max(numbers, default=0) >> 3) + 1
                checked[path][context] = numbers
            if len(contexts) > MAX_CONTEXTS:
                raise boundary.Tampering(f"coverage data of more than {MAX_CONTEXTS} contexts")
            if bitmaps > MAX_BITMAP_BYTES:
                raise boundary.Tampering("coverage data of lines too far apart")
        tracers = {}
        for path, plugin in boundary.mapping(data["tracers"], "coverage data's file tracers").items():
            if path not in checked:
                raise boundary.Tampering("a coverage file tracer for a file not measured")
            tracers[path] = boundary.text(plugin, "a coverage file tracer")
        return {"files": checked, "tracers": tracers}

    def add(self, checked: dict | None) -> None:
        """Keep a test's checked data until the run loop ends."""
        if not checked:
            return
        from coverage import CoverageData

        if self._pending is None:
            self._pending = CoverageData(no_disk=True)
        pending = self._pending
        by_context: dict[str, dict[str, list]] = {}
        for path, contexts in checked["files"].items():
            for context, numbers in contexts.items():
                by_context.setdefault(context, {})[path] = numbers
        try:
            for context, files in sorted(by_context.items()):
                pending.set_context(context)
                if self.arcs:
                    pending.add_arcs(files)
                else:
                    pending.add_lines(files)
            if checked["tracers"]:
                pending.add_file_tracers(checked["tracers"])
        except Exception as exc:  # noqa: BLE001 - e.g. a file tracer that conflicts
            warnings.warn(pytest.PytestWarning(f"pytest-isolate: coverage data of an isolated test was "
                                               f"left out ({type(exc).__name__}: {exc})"))
        self.tests += 1

    # -- the merge -----------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtestloop(self, session: pytest.Session):
        """Inside pytest-cov's own wrapper (trylast: called after it), so the data is
        in before pytest-cov saves and combines."""
        try:
            return (yield)
        finally:
            self.merge()

    def merge(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        cov = running()
        if cov is None:
            warnings.warn(pytest.PytestWarning(
                "pytest-isolate: coverage stopped before the end of the run; the lines isolated "
                "tests ran were not added to it"))
            return
        # get_data() also warns about sources never imported and the like: once is
        # enough, when coverage saves.
        quiet = ("_warn_no_data", "_warn_unimported_source", "_warn_preimported_source")
        saved = {name: getattr(cov, name) for name in quiet if hasattr(cov, name)}
        try:
            for name in saved:
                setattr(cov, name, False)
            cov.get_data().update(pending)
        except Exception as exc:  # noqa: BLE001 - coverage's DataError, an old coverage
            warnings.warn(pytest.PytestWarning(
                f"pytest-isolate: the lines isolated tests ran could not be added to the coverage data "
                f"({type(exc).__name__}: {exc})"))
        finally:
            for name, value in saved.items():
                setattr(cov, name, value)


def _path(value: Any) -> str:
    path = boundary.text(value, "a covered file's path")
    if not os.path.isabs(path) or "\0" in path:
        raise boundary.Tampering("a covered file's path that is not absolute")
    return path


def _line(value: Any, low: int) -> int:
    return boundary.integer(value, "a covered line", low, MAX_LINE)
