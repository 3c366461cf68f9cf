"""pytest-isolate: run pytest tests in real Linux containers, without a daemon."""

__version__ = "0.1.0"
