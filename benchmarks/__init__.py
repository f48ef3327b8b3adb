"""The benchmarks, installed as fasttrain.benchmarks: `fasttrain bench [NAME ...]` runs them, or one alone with
`python -m fasttrain.benchmarks.bench_NAME [--device cpu|cuda] [--quick] [--out DIR]`."""
