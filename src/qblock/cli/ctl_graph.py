"""``qblock ctl graph``: the block graph as a text tree, DOT, or an SVG/PNG picture.

Built from ``x-debug-query-block-graph`` (REFERENCE §4.2: nodes with ids and types, edges with
child name, perm and shared-perm), enriched with driver and filename from
``query-named-block-nodes`` and export ids from ``query-block-exports`` when they are known.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import graphviz

# x-debug-query-block-graph node types, listed at the top of the tree in this order.
TYPE_ORDER = ("block-backend", "block-job", "block-driver")
_SHAPES = {"block-backend": ("ellipse", "#cfe2f3"), "block-job": ("parallelogram", "#fde9c9"),
           "block-driver": ("box", "#ffffff")}


@dataclasses.dataclass
class GraphNode:
    """One vertex: a BlockBackend, a block job or a BlockDriverState (node)."""

    id: int
    type: str
    name: str
    driver: str | None = None
    filename: str | None = None
    exports: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        """Node-name for nodes; what owns the BlockBackend for backends."""
        if self.type == "block-backend":
            if self.name:
                return f"BlockBackend {self.name}"
            if self.exports:
                return f"BlockBackend (export {', '.join(self.exports)})"
            return f"BlockBackend #{self.id} (anonymous)"
        if self.type == "block-job":
            return f"block-job {self.name}"
        return self.name


@dataclasses.dataclass
class GraphEdge:
    """One BdrvChild: parent -> child with its name and permissions (QAPI names)."""

    parent: int
    child: int
    name: str
    perm: list[str]
    shared_perm: list[str]

    @property
    def perm_text(self) -> str:
        return f"perm: {', '.join(self.perm) or '-'}"

    @property
    def shared_text(self) -> str:
        return f"shared: {', '.join(self.shared_perm) or '-'}"


def _unwrap(reply: Any) -> Any:
    """Accept a bare return value or a saved ``{"return": ...}`` reply."""
    if isinstance(reply, dict) and "return" in reply:
        return reply["return"]
    return reply


@dataclasses.dataclass
class BlockGraph:
    """The block graph as x-debug-query-block-graph describes it."""

    nodes: dict[int, GraphNode]
    edges: list[GraphEdge]

    @classmethod
    def from_replies(cls, graph: Any, named_nodes: Any = None,
                     exports: Any = None) -> BlockGraph:
        """Build from the replies (bare or ``{"return": ...}``); the last two are optional."""
        graph = _unwrap(graph)
        info = {n["node-name"]: n for n in _unwrap(named_nodes) or [] if n.get("node-name")}
        nodes = {}
        for n in graph["nodes"]:
            node = GraphNode(n["id"], n["type"], n["name"])
            if node.type == "block-driver" and node.name in info:
                node.driver = info[node.name].get("drv")
                node.filename = info[node.name].get("file")
            nodes[node.id] = node
        edges = [GraphEdge(e["parent"], e["child"], e["name"], list(e["perm"]),
                           list(e["shared-perm"])) for e in graph["edges"]]
        g = cls(nodes, edges)
        g._attach_exports(_unwrap(exports) or [])
        return g

    def _attach_exports(self, exports: list[dict[str, Any]]) -> None:
        """Name an anonymous BlockBackend after the export(s) on the node it is attached to.

        Exports own an unnamed BlockBackend; the graph does not say which, so a backend is only
        named when it is the single anonymous backend on that node.
        """
        by_node: dict[str, list[str]] = {}
        for e in exports:
            by_node.setdefault(e["node-name"], []).append(e["id"])
        anonymous: dict[str, list[GraphNode]] = {}
        for edge in self.edges:
            parent = self.nodes[edge.parent]
            if parent.type == "block-backend" and not parent.name:
                anonymous.setdefault(self.nodes[edge.child].name, []).append(parent)
        for node_name, backends in anonymous.items():
            if len(backends) == 1 and node_name in by_node:
                backends[0].exports = tuple(by_node[node_name])

    def children(self, node_id: int) -> list[GraphEdge]:
        return [e for e in self.edges if e.parent == node_id]

    def roots(self) -> list[GraphNode]:
        """Vertices nobody points at: backends, jobs, then unattached nodes (by id)."""
        pointed = {e.child for e in self.edges}
        free = [n for n in self.nodes.values() if n.id not in pointed]
        return sorted(free, key=lambda n: (TYPE_ORDER.index(n.type)
                                           if n.type in TYPE_ORDER else len(TYPE_ORDER), n.id))

    def label(self, node: GraphNode) -> str:
        parts = [node.title]
        if node.driver:
            parts.append(f"({node.driver})")
        if node.filename:
            parts.append(node.filename)
        return " ".join(parts)


def render_text(g: BlockGraph) -> str:
    """A tree: roots at the left margin, each edge as ``child-name: node`` plus its perms.

    A node reached twice (shared by two parents) is expanded once and marked afterwards.
    """
    out: list[str] = []
    seen: set[int] = set()

    def walk(node_id: int, prefix: str) -> None:
        edges = g.children(node_id)
        for i, edge in enumerate(edges):
            last = i == len(edges) - 1
            child = g.nodes[edge.child]
            again = edge.child in seen
            branch = "└── " if last else "├── "
            out.append(f"{prefix}{branch}{edge.name}: {g.label(child)}"
                       + (" (see above)" if again else ""))
            inner = prefix + ("    " if last else "│   ")
            bar = "│   " if g.children(edge.child) and not again else "    "
            out.append(f"{inner}{bar}{edge.perm_text}; {edge.shared_text}")
            if not again:
                seen.add(edge.child)
                walk(edge.child, inner)

    for root in g.roots():
        seen.add(root.id)
        out.append(g.label(root))
        walk(root.id, "")
    return "\n".join(out) + "\n"


def _dot_escape(text: str) -> str:
    """Keep backslashes literal: in DOT labels they start escapes such as ``\\n``."""
    return text.replace("\\", "\\\\")


def to_dot(g: BlockGraph) -> graphviz.Digraph:
    """The graph for graphviz: boxes for nodes, ellipses for BlockBackends, perms on edges."""
    dot = graphviz.Digraph("block_graph", graph_attr={"rankdir": "TB", "fontname": "Helvetica"},
                           node_attr={"fontname": "Helvetica", "style": "filled"},
                           edge_attr={"fontname": "Helvetica", "fontsize": "10"})
    for node in sorted(g.nodes.values(), key=lambda n: n.id):
        lines = [node.title]
        if node.driver:
            lines.append(node.driver)
        if node.filename:
            lines.append(node.filename)
        shape, color = _SHAPES.get(node.type, ("box", "#ffffff"))
        dot.node(f"n{node.id}", r"\n".join(map(_dot_escape, lines)), shape=shape, fillcolor=color)
    for edge in g.edges:
        dot.edge(f"n{edge.parent}", f"n{edge.child}",
                 label=r"\n".join(map(_dot_escape, (edge.name, edge.perm_text, edge.shared_text))))
    return dot


def render(g: BlockGraph, fmt: str) -> bytes:
    """Output in ``fmt`` (text, dot, svg or png); graphviz warnings go to stderr, errors raise."""
    if fmt == "text":
        return render_text(g).encode()
    dot = to_dot(g)
    if fmt == "dot":
        return dot.source.encode()
    return dot.pipe(format=fmt)
