"""Evaluation: passkey retrieval by length and depth, accuracy and loss vs context length, plots."""
