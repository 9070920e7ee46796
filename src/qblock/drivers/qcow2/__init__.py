"""The qcow2 format driver (QEMU block/qcow2*.c)."""
