"""How many examples a property test draws.

``make test`` runs each property on a fifth of its examples (at least 10), derandomized:
the same examples on every machine and every run, so that the quick suite cannot flip by
chance. ``make test-all`` (``PLUMB_HYPOTHESIS=full``, what CI runs) draws every test's
full count afresh, and so keeps exploring."""

from __future__ import annotations

import os

from hypothesis import settings

FULL = os.environ.get("PLUMB_HYPOTHESIS") == "full"

settings.register_profile("quick", derandomize=True, database=None, print_blob=True)
settings.register_profile("full", print_blob=True)
settings.load_profile("full" if FULL else "quick")


def examples(n: int) -> int:
    """``n`` under the full profile, else n / 5 (at least 10)."""
    return n if FULL else max(10, n // 5)
