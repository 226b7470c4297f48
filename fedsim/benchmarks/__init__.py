"""Benchmarks behind ``fedsim bench`` (JSON on stdout): the vectorized engine against a per-client loop and a
centralized batch (:mod:`.engine`), the executors and Flower's simulation engine (:mod:`.engine`,
:mod:`.flower_baseline`), and the local optimizers' step time and state (:mod:`.optimizers`). Kept apart from
the modules a simulation imports."""
