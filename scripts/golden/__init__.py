"""One module per family of golden fixtures (`scripts/make_golden.py` writes them all)."""
