"""Triton kernels of moe_kernels (installed as ``moe_kernels.triton_kernels``).

Layers, from the bottom up:

* ``_gating.py``  -- top-k gating (softmax/sigmoid, correction bias, grouped selection, any E) and
  its backward;
* ``_routing.py`` -- the device-side stable counting sort of (token, slot) pairs: histogram,
  scans, scatter and padding fill in five launches, no host sync;
* ``_permute.py`` -- permute / unpermute (fp32, slot order, no atomics), the routing-weight
  gradient and per-expert bias-gradient sums;
* ``_gemm.py``    -- the grouped GEMM (ragged or padded row tiles, A rows gathered through the
  routing plan, fused gated activation and routing weight epilogues), the ragged-K weight
  gradient and the activation backward;
* ``_config.py`` + ``configs.json`` -- tile configurations per GPU family, kernel kind, dtype and
  rows per expert; ``bench/tune_triton.py`` refreshes them on a GPU;
* ``ops_common.py`` -- what the launchers share: output allocation (NaN-poisoned in debug mode),
  argument checks, and the GEMM launch helpers with their weight views;
* ``ops_gating.py``, ``ops_routing.py``, ``ops_permute.py``, ``ops_gemm.py``, ``ops_moe_ffn.py``
  -- the launchers, one per op schema, by op family;
* ``ops.py``      -- the op table ``IMPLS`` collected from them, registered by
  :mod:`moe_kernels._registry` as ``moe_kernels::<op>_triton``.

Numerics and tolerances: gating, routing and reductions are fp32 and bitwise deterministic. GEMMs
accumulate in fp32. fp16/bf16 results match a float64 reference to about twice PyTorch's own
rounding error in that dtype (the tolerances and their reasons: ``moe_kernels._tolerances``).
fp32 GEMMs use TF32 tensor cores on a GPU by default; ``ops.set_fp32_precision("ieee")`` or
``MOE_KERNELS_TRITON_FP32=ieee`` gives full fp32.
Inside ``moe_ffn`` the activation rows fed to GEMM 2 are rounded to the input dtype (as a PyTorch
bf16 layer would), the per-slot outputs and their sum stay fp32.

Verification without a GPU: ``make test-triton`` runs the op test modules (``tests/test_<op>.py``)
with only this backend selected, every kernel in Triton's interpreter against the reference, and ``python -m moe_kernels.tools.gpu_gate`` compiles
every shipped variant for sm_80 / sm_86 / sm_90 and checks spills, shared memory and tensor-core
instructions.
"""
