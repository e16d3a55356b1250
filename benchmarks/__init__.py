"""Throughput and memory benchmarks with their recorded results (see the .md files here)."""
