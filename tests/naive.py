"""Deliberately naive float64 models of every op, written from the specification alone.

These loops go token by token, slot by slot, expert by expert, with plain Python arithmetic where
it is cheap enough, so they share no code and no algorithm with ``moe_kernels.reference`` (which
sorts, gathers and batches).  Each returns float64 tensors (or int64 index tensors) so the tests can
compare any backend's output with them.
"""

from __future__ import annotations

import math

import torch


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# ----------------------------------------------------------------------------------------------
# topk_gating
# ----------------------------------------------------------------------------------------------
def _sort_desc(values: list[float], candidates: list[int]) -> list[int]:
    """Candidates by descending value, ties to the lower index."""
    return sorted(candidates, key=lambda i: (-values[i], i))


def _rel_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def naive_topk_gating(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_expert_groups: int | None = None,
    topk_groups: int | None = None,
    routed_scaling_factor: float = 1.0,
    tie_tol: float = 1e-6,
):
    """Returns (weights float64 [T, k], ids int64 [T, k], set_ok bool [T], order_ok bool [T]).

    ``set_ok[t]`` is False when row t has a true near-tie that may change *which* experts are
    chosen (the k-th and (k+1)-th eligible selection scores, or the last kept and first dropped
    group values, closer than ``tie_tol`` relative).  ``order_ok[t]`` is False when two chosen
    experts have near-equal selection scores, so their order may legitimately differ.
    """
    T, E = logits.shape
    lg = logits.detach().to(torch.float64).cpu().tolist()
    bias = (
        [0.0] * E
        if correction_bias is None
        else correction_bias.detach().to(torch.float64).cpu().tolist()
    )
    weights = torch.zeros(T, top_k, dtype=torch.float64)
    ids = torch.zeros(T, top_k, dtype=torch.int64)
    set_ok = [True] * T
    order_ok = [True] * T
    for t in range(T):
        row = lg[t]
        if scoring == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            s = sum(ex)
            score = [v / s for v in ex]
        elif scoring == "sigmoid":
            score = [1.0 / (1.0 + math.exp(-v)) for v in row]
        else:
            raise ValueError(scoring)
        sel = [score[e] + bias[e] for e in range(E)]

        eligible = list(range(E))
        if num_expert_groups:
            G = num_expert_groups
            size = E // G
            gval = []
            for g in range(G):
                members = _sort_desc(sel, list(range(g * size, (g + 1) * size)))
                gval.append(sum(sel[i] for i in members[:2]))
            order = sorted(range(G), key=lambda g: (-gval[g], g))
            kept = order[:topk_groups]
            if (
                topk_groups < G
                and _rel_gap(gval[order[topk_groups - 1]], gval[order[topk_groups]]) < tie_tol
            ):
                set_ok[t] = False
            eligible = [e for g in sorted(kept) for e in range(g * size, (g + 1) * size)]

        ranked = _sort_desc(sel, eligible)
        chosen = ranked[:top_k]
        if len(ranked) > top_k and _rel_gap(sel[ranked[top_k - 1]], sel[ranked[top_k]]) < tie_tol:
            set_ok[t] = False
        for a, b in zip(chosen[:-1], chosen[1:], strict=True):
            if _rel_gap(sel[a], sel[b]) < tie_tol:
                order_ok[t] = False
        w = [score[e] for e in chosen]
        if renormalize:
            tot = sum(w)
            w = [v / tot for v in w]
        for s in range(top_k):
            weights[t, s] = w[s] * routed_scaling_factor
            ids[t, s] = chosen[s]
    return (
        weights,
        ids,
        torch.tensor(set_ok, dtype=torch.bool),
        torch.tensor(order_ok, dtype=torch.bool),
    )


# ----------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------
def naive_num_rows(T: int, k: int, E: int, block_size: int | None) -> int:
    """Rows of the permuted layout, written from the routing algebra independently of
    ``moe_kernels.plan.num_rows``: the T k pairs, or with padding each expert's segment rounded up
    to ``block_size`` in the worst case (E - 1 padding rows each), the total rounded up too."""
    bs = block_size or 0
    return T * k if bs == 0 else round_up(T * k + E * (bs - 1), bs)


def naive_route(topk_ids: torch.Tensor, num_experts: int, block_size: int | None = None) -> dict:
    """Expert by expert, scan every (token, slot) pair in flat order and hand out rows."""
    T, k = topk_ids.shape
    ids = topk_ids.detach().cpu().tolist()
    E = num_experts
    bs = block_size or 0
    num_rows = naive_num_rows(T, k, E, bs)
    counts = [0] * E
    offs = [0] * E
    row_of_slot = [[-1] * k for _ in range(T)]
    slot_of_row = [-1] * num_rows
    start = 0
    for e in range(E):
        row = start
        for t in range(T):
            for s in range(k):
                if ids[t][s] == e:
                    row_of_slot[t][s] = row
                    slot_of_row[row] = t * k + s
                    row += 1
                    counts[e] += 1
        end = start + (counts[e] if bs == 0 else round_up(counts[e], bs))
        offs[e] = end
        start = end
    block_expert = None
    if bs:
        block_expert = [-1] * (num_rows // bs)
        lo = 0
        for e in range(E):
            for b in range(lo // bs, offs[e] // bs):
                block_expert[b] = e
            lo = offs[e]
    i64 = torch.int64
    return {
        "tokens_per_expert": torch.tensor(counts, dtype=i64),
        "offs": torch.tensor(offs, dtype=i64),
        "row_of_slot": torch.tensor(row_of_slot, dtype=i64).reshape(T, k),
        "slot_of_row": torch.tensor(slot_of_row, dtype=i64),
        "num_rows": num_rows,
        "block_expert": None if block_expert is None else torch.tensor(block_expert, dtype=i64),
    }


# ----------------------------------------------------------------------------------------------
# permute / unpermute
# ----------------------------------------------------------------------------------------------
def naive_permute(x: torch.Tensor, slot_of_row: torch.Tensor, k: int) -> torch.Tensor:
    xs = x.detach().to(torch.float64).cpu()
    rows = slot_of_row.cpu().tolist()
    out = torch.zeros(len(rows), x.shape[1], dtype=torch.float64)
    for r, slot in enumerate(rows):
        if slot >= 0:
            out[r] = xs[slot // k]
    return out


def naive_unpermute(
    y: torch.Tensor, row_of_slot: torch.Tensor, topk_weights: torch.Tensor | None
) -> torch.Tensor:
    ys = y.detach().to(torch.float64).cpu()
    ros = row_of_slot.cpu().tolist()
    T = len(ros)
    k = row_of_slot.shape[1]
    w = None if topk_weights is None else topk_weights.detach().to(torch.float64).cpu().tolist()
    out = torch.zeros(T, y.shape[1], dtype=torch.float64)
    for t in range(T):
        for s in range(k):
            r = ros[t][s]
            if r >= 0:
                out[t] += (1.0 if w is None else w[t][s]) * ys[r]
    return out


# ----------------------------------------------------------------------------------------------
# grouped_gemm
# ----------------------------------------------------------------------------------------------
def naive_grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, trans_b: bool = False
) -> torch.Tensor:
    a64 = a.detach().to(torch.float64).cpu()
    b64 = b.detach().to(torch.float64).cpu()
    M, K = a.shape
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.zeros(M, N, dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.cpu().tolist()):
        w = b64[e].t() if trans_b else b64[e]  # [K, N]
        for r in range(start, end):
            for n in range(N):
                out[r, n] = torch.dot(a64[r], w[:, n])
        start = end
    return out


# ----------------------------------------------------------------------------------------------
# moe_ffn
# ----------------------------------------------------------------------------------------------
def naive_act(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float, limit: float):
    out = torch.empty_like(gate)
    for i in range(gate.shape[0]):
        g = float(gate[i])
        u = float(up[i])
        if activation == "swiglu":
            a = g / (1.0 + math.exp(-g)) * u
        elif activation == "geglu":
            a = 0.5 * g * (1.0 + math.erf(g / math.sqrt(2.0))) * u
        elif activation == "swiglu_oai":
            g = min(g, limit)
            u = min(max(u, -limit), limit)
            a = (u + 1.0) * g / (1.0 + math.exp(-alpha * g))
        else:
            raise ValueError(activation)
        out[i] = a
    return out


def naive_moe_ffn(
    x,
    w_gate_up,
    w_down,
    topk_weights,
    topk_ids,
    activation="swiglu",
    gate_up_bias=None,
    down_bias=None,
    alpha=1.702,
    limit=7.0,
    interleaved=False,
):
    """out[t] = sum_s w[t,s] * (W_down[e] act(W_gate_up[e] x[t] + b_gu[e]) + b_d[e])."""

    def f64(v):
        return None if v is None else v.detach().to(torch.float64).cpu()

    x64, wgu, wd, tw = f64(x), f64(w_gate_up), f64(w_down), f64(topk_weights)
    bgu, bd = f64(gate_up_bias), f64(down_bias)
    ids = topk_ids.cpu().tolist()
    T, H = x.shape
    E, two_i, _ = w_gate_up.shape
    I = two_i // 2  # noqa: E741
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for s in range(len(ids[t])):
            e = ids[t][s]
            if e < 0 or e >= E:
                continue
            h = torch.mv(wgu[e], x64[t])
            if bgu is not None:
                h = h + bgu[e]
            if interleaved:
                gate = torch.stack([h[2 * i] for i in range(I)])
                up = torch.stack([h[2 * i + 1] for i in range(I)])
            else:
                gate, up = h[:I], h[I:]
            a = naive_act(gate, up, activation, alpha, limit)
            o = torch.mv(wd[e], a)
            if bd is not None:
                o = o + bd[e]
            out[t] += tw[t, s] * o
    return out
