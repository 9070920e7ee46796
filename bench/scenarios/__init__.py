"""Every benchmark scenario: one module per topic, each registering its scenarios on import.

Adding a scenario means adding a module here (or an entry to an existing one) that calls
``bench.scenario.register``; ``load_all`` imports every module of this package.
"""
from __future__ import annotations

import importlib
import pkgutil

from bench.scenario import REGISTRY, Scenario


def load_all() -> dict[str, Scenario]:
    """Import every scenario module (in name order) and return the registry."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY
