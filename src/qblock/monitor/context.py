"""What a QMP command handler sees: the daemon's block state and the calling session."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from qblock.monitor.events import EventBus

if TYPE_CHECKING:
    from qblock.block.backend import BlockBackend


@dataclasses.dataclass
class BlockState:
    """Everything the monitor manages besides the node registry (qblock.block.node.registry).

    ``backends`` are the BlockBackends the daemon holds (exports, jobs); ``exports`` and ``jobs``
    are filled by the NBD and job layers; ``quit_requested`` is set by ``quit``.
    """

    events: EventBus = dataclasses.field(default_factory=EventBus)
    backends: list[BlockBackend] = dataclasses.field(default_factory=list)
    exports: dict[str, Any] = dataclasses.field(default_factory=dict)
    jobs: dict[str, Any] = dataclasses.field(default_factory=dict)
    quit_requested: bool = False


@dataclasses.dataclass
class CommandContext:
    """Passed to every handler: the shared state and the session that sent the command."""

    state: BlockState
    session: Any = None
