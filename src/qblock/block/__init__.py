"""The block graph: nodes, edges with permissions, the request path and BlockBackends."""
