"""Throughput and memory benchmarks of yulan_tune against plain trl / transformers baselines (see RESULTS.md)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
