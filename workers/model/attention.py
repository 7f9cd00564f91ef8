"""Grouped-query attention with RoPE and an optional sliding window, over the paged KV cache.

One engine step holds B sequences, each with some new tokens (a prefill chunk or one decode token).
The new tokens are flattened to T rows in sequence order. Each sequence's keys are its cached past
(only the window's worth for sliding-window models) followed by its new tokens; everything is padded
to [B, Lk] and run as one batched SDPA call.
Shapes: T new tokens, B sequences, Lq max new tokens per sequence, Lk max keys per sequence,
H query heads, Hkv kv heads, Dh head dim, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.model.kv_cache import KVCachePool, SequenceBlocks
from workers.model.rope import apply_rope


@dataclass(frozen=True)
class SequenceChunk:
    """New tokens [start, start + num_new) of one sequence whose blocks are already reserved."""

    blocks: SequenceBlocks
    start: int
    num_new: int


@dataclass(frozen=True)
class AttentionMetadata:
    """Index tensors for one step, built once and shared by every layer."""

    positions_T: torch.Tensor  # [T] absolute positions of the new tokens
    past_slots_BLk: torch.Tensor  # [B, Lk] cache slot of each past key (0 elsewhere)
    is_past_BLk: torch.Tensor  # [B, Lk] bool
    new_index_BLk: torch.Tensor  # [B, Lk] row in T of each new key (0 elsewhere)
    query_index_BLq: torch.Tensor  # [B, Lq] row in T of each query (0 for padding)
    query_valid_BLq: torch.Tensor  # [B, Lq] bool
    mask_B1LqLk: torch.Tensor  # [B, 1, Lq, Lk] bool, True where attention is allowed
    write_slots_W: torch.Tensor  # [W] cache slots written after the step
    write_rows_W: torch.Tensor  # [W] rows in T whose K/V go there


def build_attention_metadata(pool: KVCachePool, chunks: list[SequenceChunk]) -> AttentionMetadata:
    device = pool.spec.device
    window = pool.spec.sliding_window
    lq = max(c.num_new for c in chunks)
    context_starts = [pool.context_start(c.start) for c in chunks]
    lk = max(c.start + c.num_new - s for c, s in zip(chunks, context_starts, strict=True))
    b = len(chunks)
    past_slots = torch.zeros(b, lk, dtype=torch.int64)
    is_past = torch.zeros(b, lk, dtype=torch.bool)
    new_index = torch.zeros(b, lk, dtype=torch.int64)
    query_index = torch.zeros(b, lq, dtype=torch.int64)
    query_valid = torch.zeros(b, lq, dtype=torch.bool)
    q_pos = torch.zeros(b, lq, dtype=torch.int64)
    k_pos = torch.full((b, lk), -1, dtype=torch.int64)
    positions, write_slots, write_rows = [], [], []
    row = 0
    for i, (chunk, ctx) in enumerate(zip(chunks, context_starts, strict=True)):
        num_past, n = chunk.start - ctx, chunk.num_new
        new_rows = torch.arange(row, row + n)
        past_slots[i, :num_past] = pool.slots(chunk.blocks, ctx, chunk.start)
        is_past[i, :num_past] = True
        new_index[i, num_past : num_past + n] = new_rows
        k_pos[i, : num_past + n] = torch.arange(ctx, chunk.start + n)
        query_index[i, :n] = new_rows
        query_valid[i, :n] = True
        q_pos[i, :n] = torch.arange(chunk.start, chunk.start + n)
        q_pos[i, n:] = chunk.start + n - 1  # padded queries see something, output discarded
        positions.append(torch.arange(chunk.start, chunk.start + n))
        kept = min(n, len(chunk.blocks.blocks) * pool.spec.block_size) if window else n
        write_slots.append(pool.slots(chunk.blocks, chunk.start + n - kept, chunk.start + n))
        write_rows.append(new_rows[n - kept :])
        row += n
    allowed = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window:
        allowed &= k_pos[:, None, :] > q_pos[:, :, None] - window
    return AttentionMetadata(
        positions_T=torch.cat(positions).to(device),
        past_slots_BLk=past_slots.to(device),
        is_past_BLk=is_past.to(device),
        new_index_BLk=new_index.to(device),
        query_index_BLq=query_index.to(device),
        query_valid_BLq=query_valid.to(device),
        mask_B1LqLk=allowed[:, None].to(device),
        write_slots_W=torch.cat(write_slots).to(device),
        write_rows_W=torch.cat(write_rows).to(device),
    )


def paged_attention(
    q_THDh: torch.Tensor,
    k_THkvDh: torch.Tensor,
    v_THkvDh: torch.Tensor,
    k_cache_BSHkvDh: torch.Tensor,
    v_cache_BSHkvDh: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Attention of the new queries over past + new keys; then writes the new K/V to the cache."""
    num_tokens, num_heads, head_dim = q_THDh.shape
    k_flat = k_cache_BSHkvDh.view(-1, *k_cache_BSHkvDh.shape[2:])  # [slots, Hkv, Dh]
    v_flat = v_cache_BSHkvDh.view(-1, *v_cache_BSHkvDh.shape[2:])
    is_past = meta.is_past_BLk[:, :, None, None]
    keys_BLkHD = torch.where(is_past, k_flat[meta.past_slots_BLk], k_THkvDh[meta.new_index_BLk])
    values_BLkHD = torch.where(is_past, v_flat[meta.past_slots_BLk], v_THkvDh[meta.new_index_BLk])
    queries_BLqHD = q_THDh[meta.query_index_BLq]
    out_BHLqD = F.scaled_dot_product_attention(
        queries_BLqHD.transpose(1, 2),
        keys_BLkHD.transpose(1, 2),
        values_BLkHD.transpose(1, 2),
        attn_mask=meta.mask_B1LqLk,
        enable_gqa=True,
    )
    out_THD = out_BHLqD.transpose(1, 2)[meta.query_valid_BLq]  # row-major = token order
    k_flat[meta.write_slots_W] = k_THkvDh[meta.write_rows_W]
    v_flat[meta.write_slots_W] = v_THkvDh[meta.write_rows_W]
    return out_THD.reshape(num_tokens, num_heads * head_dim)


def project_qkv(
    x_TD: torch.Tensor,
    wqkv_QD: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    cos_TDh: torch.Tensor,
    sin_TDh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused matmul for q, k, v; RoPE on q and k."""
    num_tokens = x_TD.shape[0]
    qkv = x_TD @ wqkv_QD.t()  # [T, (H + 2 Hkv) Dh]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q_THDh = apply_rope(q.view(num_tokens, num_heads, head_dim), cos_TDh, sin_TDh)
    k_THkvDh = apply_rope(k.view(num_tokens, num_kv_heads, head_dim), cos_TDh, sin_TDh)
    return q_THDh, k_THkvDh, v.view(num_tokens, num_kv_heads, head_dim)
