"""Adapters that plug moe_kernels into other libraries (each imports its library lazily)."""
