"""The routing plan: where each (token, slot) pair lives in the expert-sorted layout."""

from __future__ import annotations

import dataclasses

import torch
import torch.utils._pytree as pytree

__all__ = ["RoutingPlan", "num_rows"]


def num_rows(num_pairs: int, num_experts: int, block_size: int) -> int:
    """Rows of the permuted layout of ``num_pairs`` = T * k pairs over ``num_experts`` experts:
    ``num_pairs`` without padding (``block_size <= 0``), else the upper bound
    ``round_up(num_pairs + num_experts * (block_size - 1), block_size)`` (each expert's segment
    padded to a multiple of ``block_size``). Shapes only: no tensor value is read.

    The one Python copy (the registry's fake ``route``, the reference, the public checks and the
    Triton launcher use it); C++ mirrors it in ``route_num_rows`` (csrc/common/routing.h).
    """
    if block_size <= 0:
        return num_pairs
    n = num_pairs + num_experts * (block_size - 1)
    return (n + block_size - 1) // block_size * block_size


@dataclasses.dataclass(frozen=True)
class RoutingPlan:
    """Expert-sorted layout of the TK = T * k (token, slot) pairs, as produced by
    :func:`moe_kernels.route`.

    Pairs are identified by their flat index ``p = t * k + s``. Rows are the rows of the permuted
    activations ``Y = permute(X, plan)``, grouped by expert: expert ``e`` owns rows
    ``[offs[e - 1], offs[e])`` (``offs[-1]`` taken as 0). Within an expert, pairs keep their flat
    order (stable). Algebra::

        Y[row_of_slot[t, s]] = X[t]               for every kept pair
        Y[r] = X[slot_of_row[r] // k]             if slot_of_row[r] >= 0, else 0
        row_of_slot.view(-1)[slot_of_row[r]] = r  for every used row r

    Attributes:
        tokens_per_expert: int32 [E]. Number of kept pairs routed to each expert
            (``bincount`` of the valid ids).
        offs: int32 [E]. Cumulative row ends of the expert segments; exactly the ``offs`` that
            :func:`moe_kernels.grouped_gemm` takes. Without ``block_size`` it is
            ``cumsum(tokens_per_expert)``; with it, each segment is padded up to a multiple of
            ``block_size`` and ``offs`` holds the padded ends.
        row_of_slot: int32 [T, k]. Row of each pair, -1 when the pair is dropped (its id was
            outside ``[0, E)``, e.g. an expert owned by another rank).
        slot_of_row: int32 [num_rows]. Flat pair index held by each row, -1 for padding rows and
            unused rows (rows past ``offs[-1]``).
        block_expert: int32 [num_rows // block_size] or None. Expert owning each block of
            ``block_size`` rows, -1 for blocks past ``offs[-1]``; None without ``block_size``.
        num_experts: E.
        block_size: the padding granularity, or None.

    ``num_rows`` is ``T * k`` without ``block_size`` and the upper bound
    ``round_up(T * k + E * (block_size - 1), block_size)`` with it (:func:`num_rows`): sizes
    depend only on T, k, E and block_size, never on the ids, so building a plan needs no host
    synchronisation.
    """

    tokens_per_expert: torch.Tensor
    offs: torch.Tensor
    row_of_slot: torch.Tensor
    slot_of_row: torch.Tensor
    block_expert: torch.Tensor | None
    num_experts: int
    block_size: int | None = None

    @property
    def num_tokens(self) -> int:
        """T."""
        return self.row_of_slot.shape[0]

    @property
    def top_k(self) -> int:
        """k."""
        return self.row_of_slot.shape[1]

    @property
    def num_rows(self) -> int:
        """Rows of the permuted layout (see the class docstring)."""
        return self.slot_of_row.shape[0]


def _flatten(plan: RoutingPlan):
    children = [
        plan.tokens_per_expert,
        plan.offs,
        plan.row_of_slot,
        plan.slot_of_row,
        plan.block_expert,
    ]
    return children, (plan.num_experts, plan.block_size)


def _unflatten(children, context) -> RoutingPlan:
    return RoutingPlan(*children, num_experts=context[0], block_size=context[1])


def _flatten_with_keys(plan: RoutingPlan):
    children, context = _flatten(plan)
    names = ["tokens_per_expert", "offs", "row_of_slot", "slot_of_row", "block_expert"]
    return [(pytree.GetAttrKey(n), c) for n, c in zip(names, children)], context


pytree.register_pytree_node(
    RoutingPlan,
    _flatten,
    _unflatten,
    serialized_type_name="moe_kernels.RoutingPlan",
    flatten_with_keys_fn=_flatten_with_keys,
)
