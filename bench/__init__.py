"""Side-by-side benchmarks of qblock against QEMU's own tools (see bench/README.md)."""
