"""pytest plugin for mutation runs: modest, deterministic hypothesis example counts.

Loaded only by mutmut (``pytest_add_cli_args`` in ``[tool.mutmut]``), never by ``make test``. Each mutant
runs the unit tests that execute the mutated function, so a survivor pays for every property test of
that function: the ``mutation`` profile keeps each property test to a few dozen examples, and caps the
tests that set ``max_examples`` themselves (an explicit setting outranks any profile). Examples are
derandomized so a mutant's verdict does not change from one run to the next, and there is no example
database, so one mutant's failing example never leaks into another's run.

``HYPOTHESIS_PROFILE`` picks the profile (``mutation`` by default here); ``MUTATION_MAX_EXAMPLES`` the cap.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

MAX_EXAMPLES = int(os.environ.get("MUTATION_MAX_EXAMPLES", "25"))

settings.register_profile(
    "mutation",
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mutation"))


def _capped(s: settings) -> settings:
    if s.max_examples <= MAX_EXAMPLES:
        return s
    return settings(s, max_examples=MAX_EXAMPLES, derandomize=True, database=None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        cls = getattr(item, "cls", None)
        # Stateful machines: ``Machine.TestCase.settings = settings(...)`` on the test class.
        if cls is not None and isinstance(getattr(cls, "settings", None), settings):
            cls.settings = _capped(cls.settings)
        # @given tests: hypothesis reads this attribute each time the test runs.
        fn = getattr(item, "obj", None)
        s = getattr(fn, "_hypothesis_internal_use_settings", None)
        if isinstance(s, settings):
            fn._hypothesis_internal_use_settings = _capped(s)  # type: ignore[union-attr]
