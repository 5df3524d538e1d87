"""Throughput and memory benchmarks of yulan_tune against plain trl / transformers baselines (see RESULTS.md)."""
