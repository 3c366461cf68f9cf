"""Demo suite configuration.

Most demo tests carry no marker: they rely on ``pytest --isolate``, which runs
every test in its own container. Run without ``--isolate`` they would check the
host instead (and, as root, write ``/scratch.txt`` to the host's ``/``), so they
are skipped then; the tests with an explicit ``@pytest.mark.isolated`` marker
still run, isolated, either way.
"""

import pytest


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("isolate"):
        raise pytest.UsageError(
            "the demo needs the pytest-isolate plugin: "
            "run ./scripts/demo.sh, or `pip install .` from the repository root"
        )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--isolate") or config.getini("isolate"):
        return
    skip = pytest.mark.skip(
        reason="checks container isolation: run with `pytest --isolate` "
        "(or give the test an @pytest.mark.isolated marker)"
    )
    for item in items:
        if item.get_closest_marker("isolated") is None:
            item.add_marker(skip)
