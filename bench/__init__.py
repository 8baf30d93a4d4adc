"""Throughput and latency benchmarks of the pipeline against a bare Faust agent."""
