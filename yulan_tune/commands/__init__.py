"""Command-line entry points: argument parsing and console output only."""
