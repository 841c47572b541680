"""Tiny random-weight models in the real formats, built locally so everything runs without weights."""
