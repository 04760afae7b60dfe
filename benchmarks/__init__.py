"""Benchmarks reported against the hardware limit (numbers, not timed tests).

Modules: ``bandwidth`` (achievable memory read GB/s), ``decode`` (tok/s and the fraction of the
bandwidth roofline), ``prefill`` (tok/s and FLOP/s against a measured matmul peak), ``converter``
(HF -> ours conversion MB/s and the child's peak RSS), ``aot`` (the published models compiled for TPU and
GPU targets: memory per device, bandwidth bounds, collectives). ``run.main(argv)`` runs them and prints one
JSON line per measurement and a markdown table: ``python -m benchmarks.run [--quick] [--only ...]``.
"""
