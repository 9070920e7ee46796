"""Command-line tools: ``qblock img``, ``qblock io``, ``qblock daemon``, ``qblock ctl``, ...

The tools make no BLAS calls; numpy's OpenBLAS would otherwise start a thread per core that
spins for a while after start-up, taking CPU from the tool on small machines.  Set before
numpy is first imported; a value in the environment wins.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
