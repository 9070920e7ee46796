"""Block drivers: protocol drivers (file, null-co), format drivers (raw, qcow2) and filters."""
