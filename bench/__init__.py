"""sparsebp benchmarks (installed as sparsebp.bench; run with `sparsebp bench`).

Each benchmark checks its outputs against a dense reference before timing, interleaves the
contenders (A B C A B C ...), reports medians and ratios, and writes CSV, markdown and a PNG.
"""
