"""QMP command modules; importing this package registers every command in the registry."""
from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    """Import every module of this package so each ``@command`` declaration runs once."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


load_all()
