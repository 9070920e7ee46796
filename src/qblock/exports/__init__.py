"""Block exports: serving nodes to clients outside the process."""
