"""Benchmark harness (placeholder until the benchmark lands)."""


def add_bench_parser(sub) -> None:
    pass
