"""Benchmark scripts for axpo's ops (installed as ``axpo.benchmarks``; run via ``axpo bench <family>``)."""
