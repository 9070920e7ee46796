"""The QMP monitor: a sans-IO protocol core, an asyncio server and one command registry."""
