"""Test options shared by every suite.

`--runslow` runs the tests marked slow (the long property and fuzz runs); CI passes it through
tools/test.sh, a developer's quick loop leaves it off. A test marked `quick_twin` is the quick loop's
short run of a property that a slow test runs at 10,000 examples on the same inputs: with `--runslow`
it is skipped, since its twin covers it.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers",
                            "quick_twin: a short run of a slow test's property (skipped with --runslow)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        marker, reason = "quick_twin", "the slow run of the same property covers it (--runslow)"
    else:
        marker, reason = "slow", "slow: run with --runslow (CI does)"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)
