"""The benchmark harness of the installed ``moe-bench`` (:mod:`moe_kernels.cli`).

* :mod:`.presets` -- MoE layer shapes and routing of well-known models, custom shapes, scaling;
* :mod:`.ops` -- the inputs of one case, every op's contender on our backends, tolerances;
* :mod:`.peers` -- the peers (transformers, torch grouped_mm, vLLM, grouped_gemm, a dense matmul);
* :mod:`.suite` -- the default job: check, time, rows, tables, progress;
* :mod:`.roofline` -- analytic FLOP / byte counts, roofline, GPU predictions, the plot;
* :mod:`.schema` -- the one JSON / CSV schema;
* :mod:`.harness` -- random inputs, timing in turns with cache eviction, the machine's
  read-bandwidth and dense-matmul ceilings, Hugging Face experts, tables;
* :mod:`.compare` -- the side-by-side comparison (``moe-bench --full``);
* :mod:`.machine` -- the CPU's model, microarchitecture, flags and caches, the build commit.

Nothing here is on an op path. The project's own speed targets, recorded results and per-op
scripts live in the source tree's ``bench/`` (``bench/check_targets.py``, ``bench/results/``,
``bench/bench_moe_ffn.py``, ``bench/NOTES.md``).
"""
