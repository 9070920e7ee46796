"""Opening nodes from options (block.c bdrv_open / blockdev-add).

Options are QAPI BlockdevOptions as a dict: JSON values, or keyval strings from a command line.
Child references (BlockdevRef) are either the node-name of an existing node or an inline dict
that opens an implicit child node.
"""
from __future__ import annotations

import importlib
from typing import Any

from qblock.block.graph import BdrvChild
from qblock.block.node import BlockNode, close_node, registry
from qblock.block.perm import Role
from qblock.drivers.base import BlockDriver
from qblock.drivers.options import pop_bool, pop_str, to_bool
from qblock.errors import InvalidArgument

# driver name -> "module:Class"; imported on first use so drivers may import this module.
_DRIVERS = {
    "file": "qblock.drivers.file:FileDriver",
    "host_device": "qblock.drivers.file:FileDriver",
    "raw": "qblock.drivers.raw:RawDriver",
    "null-co": "qblock.drivers.null:NullDriver",
    "null-aio": "qblock.drivers.null:NullAioDriver",
    "qcow2": "qblock.drivers.qcow2.driver:Qcow2Driver",
    "nbd": "qblock.drivers.nbd:NbdDriver",
    "blkdebug": "qblock.drivers.blkdebug:BlkdebugDriver",
}


def register_driver(name: str, target: str) -> None:
    """Make ``name`` openable; ``target`` is "module:Class"."""
    _DRIVERS[name] = target


def driver_names() -> list[str]:
    return sorted(_DRIVERS)


def driver_class(name: str) -> type[BlockDriver]:
    """The driver class for a QAPI driver name ("Unknown driver 'x'" otherwise)."""
    target = _DRIVERS.get(name)
    if target is None:
        raise InvalidArgument(f"Parameter 'driver' does not accept value '{name}'")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


async def open_node(options: dict[str, Any], *, read_only: bool | None = None,
                    implicit: bool = False, inherit: BlockNode | None = None) -> BlockNode:
    """Open a node and its inline children; every key must be understood.

    ``inherit`` is the parent whose read-only and cache settings an implicit child inherits
    (block.c bdrv_inherited_options).
    """
    options = dict(options)
    name = options.pop("driver", None)
    if name is None:
        raise InvalidArgument("Parameter 'driver' is missing")
    drv = driver_class(name)()
    node_name = pop_str(options, "node-name")
    if node_name is None and not implicit:
        raise InvalidArgument("'node-name' must be specified for the root node")
    cache = options.pop("cache", {})
    if not isinstance(cache, dict):
        raise InvalidArgument("Invalid parameter type for 'cache', expected: object")
    cache = dict(cache)
    parent_ro = inherit.read_only if inherit is not None else False
    ro = pop_bool(options, "read-only", read_only if read_only is not None else parent_ro)
    direct = (to_bool(cache.pop("direct"), "cache.direct") if "direct" in cache
              else inherit is not None and inherit.cache_direct)
    no_flush = (to_bool(cache.pop("no-flush"), "cache.no-flush") if "no-flush" in cache
                else inherit is not None and inherit.cache_no_flush)
    if cache:
        raise InvalidArgument(f"Parameter 'cache.{next(iter(cache))}' is unexpected")
    detect_zeroes = pop_str(options, "detect-zeroes", "off", ("off", "on", "unmap"))
    # BDRV_O_UNMAP and force-share are inherited by implicit children (bdrv_inherited_options)
    discard = pop_str(options, "discard", None, ("ignore", "unmap", "off", "on"))
    unmap = (discard in ("unmap", "on") if discard is not None
             else inherit is not None and inherit.unmap)
    pop_bool(options, "auto-read-only", False)
    force_share = pop_bool(options, "force-share", inherit is not None and inherit.force_share)
    if force_share and not ro:
        raise InvalidArgument("force-share=on can only be used with read-only images")
    pop_bool(options, "active", True)
    node = BlockNode(drv, {"driver": name, **options}, node_name=node_name, read_only=ro,
                     cache_direct=direct, cache_no_flush=no_flush,
                     detect_zeroes=detect_zeroes or "off")
    node.unmap = unmap
    node.force_share = force_share
    if node_name is not None and registry.lookup(node_name) is not None:
        raise InvalidArgument(f"Duplicate nodes with node-name='{node_name}'")
    try:
        await drv.open(node, options)
        if options:
            raise InvalidArgument(f"Parameter '{next(iter(options))}' is unexpected")
        registry.add(node)
    except BaseException:
        node.closed = True
        await drv.close()
        for child in list(node.children):
            child_node = node.remove_child(child)
            if not child_node.parents and not child_node.monitor_owned:
                await close_node(child_node)
        raise
    return node


async def open_child(parent: BlockNode, options: dict[str, Any], name: str, role: Role,
                     *, allow_none: bool = False) -> BdrvChild | None:
    """Pop the BlockdevRef ``name`` from ``options`` and attach it as a child of ``parent``."""
    ref = options.pop(name, None)
    if ref is None:
        if allow_none:
            return None
        raise InvalidArgument(f"Parameter '{name}' is missing")
    if isinstance(ref, str):
        child = registry.lookup(ref)
        if child is None:
            raise InvalidArgument(f"Cannot find device='' nor node-name='{ref}'")
    elif isinstance(ref, dict):
        child = await open_node(ref, implicit=True, inherit=parent)
    else:
        raise InvalidArgument(f"Invalid parameter type for '{name}', expected: object")
    try:
        return parent.add_child(child, name, role)
    except BaseException:
        if isinstance(ref, dict):
            await close_node(child)
        raise
