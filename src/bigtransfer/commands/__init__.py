"""One module per CLI command; see bigtransfer.cli. Each builds its flags from settings fields (`options`) and runs
one library call. `library()` imports the module that does a command's work when the command runs, so building
the parser loads no training loop, demo, VTAB or benchmark code."""

from __future__ import annotations

import importlib
from types import ModuleType


def library(name: str) -> ModuleType:
    """`bigtransfer.<name>`, imported on first use (a command's implementation)."""
    return importlib.import_module(f"bigtransfer.{name}")
