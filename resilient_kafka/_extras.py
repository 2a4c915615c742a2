"""Optional dependencies: import them or say exactly which extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from resilient_kafka.errors import MissingDependencyError


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra that has it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the Python package {module.split('.')[0]!r}, which is not installed. "
            f"Install it with: pip install 'resilient-kafka[{extra}]'"
        ) from exc
