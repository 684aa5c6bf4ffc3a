"""Shared pytest configuration: the ``--slow`` option and the hypothesis profiles.

``pytest`` runs the quick suite: hypothesis tests use the ``ci`` profile (few,
bounded examples, no deadline, derandomized so CI runs are reproducible) and tests
marked ``@pytest.mark.slow`` are skipped. ``pytest --slow`` runs the slow tests too
and switches hypothesis to the ``slow`` profile (many more, random examples).
"""

from __future__ import annotations

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test dependency; without it the fuzz tests skip
    settings = None

if settings is not None:
    _common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
    settings.register_profile("ci", max_examples=60, derandomize=True, print_blob=True, **_common)
    settings.register_profile("slow", max_examples=2000, print_blob=True, **_common)
    settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        default=False,
        help="run tests marked slow and use the 'slow' hypothesis profile (many more examples)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test, run only with --slow")
    if settings is not None and config.getoption("--slow"):
        settings.load_profile("slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
