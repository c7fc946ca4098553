"""The benchmarks (pytest-benchmark), installed as discache.bench: `discache bench` runs them."""
