"""pytest-isolate: run pytest tests in real Linux containers, without a daemon.

PYTEST_DONT_REWRITE: container hosts import this package before pytest configures
itself, so it must not be marked for assertion rewriting (pytest would warn that it
is already imported, and projects with ``filterwarnings = error`` would fail).
"""

__version__ = "0.1.0"
