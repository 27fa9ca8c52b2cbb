"""Test assets that ``scripts/setup.sh`` installs (real text, real checkpoints, launchers).

A test that needs one calls :func:`require_asset`. Locally a missing asset skips the test with the
command that installs it; with ``GQA_REQUIRE_ASSETS=1`` (set by ``.ci/run``) it fails the test
instead, so CI can never go green with part of the suite silently skipped.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "GQA_REQUIRE_ASSETS"


def assets_required() -> bool:
    """True when missing assets must fail tests rather than skip them (CI)."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in {"1", "true", "yes"}


def require_asset(present: bool, what: str) -> None:
    """Skip (locally) or fail (``GQA_REQUIRE_ASSETS=1``) the calling test when ``present`` is false.

    ``what`` names the missing asset and how to install it, e.g.
    ``"python3.11-doc is not installed (scripts/setup.sh installs it)"``.
    """
    if present:
        return
    if assets_required():
        pytest.fail(f"missing test asset: {what} ({REQUIRE_ENV}=1 turns skips into failures)", pytrace=False)
    pytest.skip(what)
