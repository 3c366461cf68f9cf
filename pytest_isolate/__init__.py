"""pytest-isolate: run pytest tests in real Linux containers, without a daemon.

PYTEST_DONT_REWRITE: container hosts import this package before pytest configures
itself, so it must not be marked for assertion rewriting (pytest would warn that it
is already imported, and projects with ``filterwarnings = error`` would fail).
"""

__version__ = "0.1.0"

_SERVICES = ("service", "tcp", "log", "Service", "snapshot", "Snapshot")


def __getattr__(name: str):
    """``pytest_isolate.service`` and friends (services.py), imported on first use:
    the runtime's processes import this package without pytest."""
    if name in _SERVICES:
        from . import services

        return getattr(services, name)
    raise AttributeError(f"module 'pytest_isolate' has no attribute {name!r}")
