"""Times decode steps of the same batch in mixserve's attention rank and in transformers' MixtralModel:
prefill `context_len` random tokens per sequence, a few warm-up steps, then `timed_steps` steps each
synchronised and timed alone (the median is reported)."""

from __future__ import annotations

import statistics
import time
import warnings

import torch

from cluster.bench.decode import DecodePoint, DecodeShapes, step_bytes
from cluster.bench.parity import relative_error
from cluster.bench.rank_driver import RankDriver, sync
from workers.model.norm import rms_norm
from workers.runtime.attention_rank import AttentionRank


def _tokens(s: DecodeShapes, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prompts_BC = torch.randint(3, s.vocab_size, (batch, s.context_len), generator=gen)
    steps_SB = torch.randint(3, s.vocab_size, (s.warmup_steps + s.timed_steps, batch), generator=gen)
    return prompts_BC, steps_SB


@torch.inference_mode()
def time_mixserve(rank: AttentionRank, s: DecodeShapes, batch: int,
                  seed: int = 0) -> tuple[list[float], float, torch.Tensor]:
    """(step seconds, experts touched per layer per step, first decode step's normed hidden states [B, D])."""
    prompts_BC, steps_SB = _tokens(s, batch, seed)
    driver = RankDriver(rank)
    driver.prefill(prompts_BC.tolist())
    device = rank.model.device
    times, touched = [], []
    first = None
    for step, tokens_B in enumerate(steps_SB.tolist()):
        before_LE = rank.routed_tokens_LE.clone()
        sync(device)
        start = time.perf_counter()
        h_BD = driver.decode(tokens_B)
        sync(device)
        if step == 0:
            first = rms_norm(h_BD, rank.model.weights.final_norm_D, rank.model.cfg.rms_norm_eps)
        if step >= s.warmup_steps:
            times.append(time.perf_counter() - start)
            touched.append(float(((rank.routed_tokens_LE - before_LE) > 0).sum(dim=1).float().mean()))
    driver.release()
    return times, statistics.fmean(touched), first


@torch.inference_mode()
def time_transformers(model, s: DecodeShapes, batch: int, seed: int = 0) -> tuple[list[float], torch.Tensor]:
    """(step seconds, first decode step's final hidden states [B, D])."""
    prompts_BC, steps_SB = _tokens(s, batch, seed)
    device = model.device
    times, first = [], None
    with warnings.catch_warnings():  # past_key_values is renamed in later 5.x; the device image has an earlier one
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        cache = model(input_ids=prompts_BC.to(device), use_cache=True).past_key_values
        for step, tokens_B in enumerate(steps_SB):
            sync(device)
            start = time.perf_counter()
            out = model(input_ids=tokens_B[:, None].to(device), past_key_values=cache, use_cache=True)
            sync(device)
            cache = out.past_key_values
            if step == 0:
                first = out.last_hidden_state[:, -1]
            if step >= s.warmup_steps:
                times.append(time.perf_counter() - start)
    return times, first


def decode_point(rank: AttentionRank, model, s: DecodeShapes, batch: int, bandwidth: float) -> DecodePoint:
    mix_times, touched, mix_first = time_mixserve(rank, s, batch)
    hf_times, hf_first = time_transformers(model, s, batch)
    mix, hf = statistics.median(mix_times), statistics.median(hf_times)
    context = s.context_len + s.warmup_steps + s.timed_steps // 2  # the mean context of the timed steps
    itemsize = rank.model.dtype.itemsize
    nbytes = step_bytes(rank.model.cfg, batch, context, touched, itemsize)
    floor = nbytes["total"] / bandwidth
    return DecodePoint(
        batch=batch, context_len=context, mixserve_step_s=mix, transformers_step_s=hf, speedup_vs_transformers=hf / mix,
        mixserve_tok_s=batch / mix, transformers_tok_s=batch / hf, experts_touched_per_layer=touched,
        bytes_per_step=nbytes, floor_s=floor, mixserve_floor_fraction=floor / mix,
        transformers_floor_fraction=floor / hf,
        first_step_rel_error=relative_error(mix_first, hf_first),
    )
