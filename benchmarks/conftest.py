"""What the benchmark suites share: the figures table printed at the end.

pytest-benchmark's own table shows times per round. Many targets are other
figures: a rate, a percentile, a ratio to the baseline of the same group,
a resident memory. Each benchmark puts those into ``benchmark.extra_info``;
this plugin prints them all, group by group, after pytest-benchmark's
table, so a run shows every figure without ``--benchmark-json``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

FIGURES = pytest.StashKey[list["Figures"]]()


@dataclass
class Figures:
    group: str
    name: str
    min_s: float | None
    median_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[FIGURES] = []


@pytest.fixture(autouse=True)
def _collect_figures(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each benchmark, keep its group, times and extra_info."""
    yield

    benchmark = request.node.funcargs.get("benchmark")
    if benchmark is None or getattr(benchmark, "stats", None) is None:
        return
    stats = benchmark.stats.stats
    request.config.stash[FIGURES].append(
        Figures(
            group=benchmark.group or "(no group)",
            name=request.node.name,
            min_s=stats.min,
            median_s=stats.median,
            extra=dict(benchmark.extra_info),
        )
    )


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3f} {unit}"
    return f"{seconds / 1e-9:.1f} ns"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, [])
    if not figures:
        return

    write = terminalreporter.write_line
    terminalreporter.section("benchmark figures (extra_info)")
    for group in sorted({entry.group for entry in figures}):
        write(f"[{group}]")
        for entry in figures:
            if entry.group != group:
                continue
            write(
                f"  {entry.name}: min {_time(entry.min_s)}, "
                f"median {_time(entry.median_s)}"
            )
            if entry.extra:
                details = ", ".join(
                    f"{key}={_value(value)}" for key, value in entry.extra.items()
                )
                write(f"      {details}")
