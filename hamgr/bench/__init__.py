"""Benchmarks behind `hamgr bench <what> --json`.

Each benchmark is a module in this package that exposes a click command named
``command``. The CLI discovers them by name, so adding a benchmark never touches
the CLI module.
"""

BENCHMARKS: tuple[str, ...] = ("dataplane", "checkpoint", "overhead", "failover")
