"""Imports a benchmark script for the benchmark smoke tests."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    """benchmarks/<name>.py: as axpo.benchmarks.<name> when installed, else from the source
    checkout (where benchmarks/ is a plain package)."""
    try:
        return importlib.import_module(f"axpo.benchmarks.{name}")
    except ImportError:
        sys.path.insert(0, str(ROOT))
        return importlib.import_module(f"benchmarks.{name}")
