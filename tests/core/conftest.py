"""Fixtures shared by the tests of calejo_core.

Each compiled module ``calejo_core.NAME`` has a pure-Python reference,
``calejo_core.reference.NAME``, with the same API and rules. A fixture made
by :func:`implementations` runs a test once against each of them, with the
ids ``compiled`` and ``reference``.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

IMPLEMENTATIONS = ("compiled", "reference")


def load(name: str, kind: str) -> Any:
    """The module ``calejo_core.NAME`` (compiled) or its reference."""
    package = "calejo_core" if kind == "compiled" else "calejo_core.reference"
    return importlib.import_module(f"{package}.{name}")


def implementations(name: str) -> Any:
    """A fixture named ``NAME_impl`` yielding each implementation of ``NAME``."""

    @pytest.fixture(params=IMPLEMENTATIONS, name=f"{name}_impl")
    def fixture(request: pytest.FixtureRequest) -> Any:
        return load(name, request.param)

    return fixture


gate_impl = implementations("gate")
codecs_impl = implementations("codecs")
