"""The NBD export: sans-IO protocol core and its asyncio server."""
