"""Pallas kernels and their pure-JAX references, one folder per op, each with one public `api.py`."""
