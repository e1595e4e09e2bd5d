"""The benchmark harness of the installed ``moe-bench`` (:mod:`moe_kernels.cli`).

* :mod:`.harness` -- expert-layer shapes of real models, random inputs, timing in turns with cache
  eviction, the machine's read-bandwidth and dense-matmul ceilings, Hugging Face experts, tables;
* :mod:`.compare` -- the side-by-side comparison (``moe-bench --full``);
* :mod:`.machine` -- the CPU's model, flags and caches.

Nothing here is on an op path. The project's own speed targets, recorded results and per-op
scripts live in the source tree's ``bench/`` (``bench/bench_moe_ffn.py``, ``bench/NOTES.md``).
"""
