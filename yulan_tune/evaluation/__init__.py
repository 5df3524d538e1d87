"""Measuring models: held-out exact-match on the bundled math problems, held-out preference metrics."""
