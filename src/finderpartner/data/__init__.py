"""Data sets: loading and the embedded synthetic sample."""
