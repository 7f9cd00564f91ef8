"""Expert parallelism without Ray: spawned gloo ranks run the attention rank and 1-4 expert ranks, and the
logits at every prefill and decode position match transformers within 1e-4 (fp32), in one batch and with
every step of two or more sequences split into two ping-pong micro-batches; two coordinators sharing the
expert ranks in lockstep, with different step counts (one prefills in chunks) and micro-batch counts; and
redundant experts, whose rows the coordinators split between copies on different workers (issue 22)."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.multiprocessing as mp

from tests.reference import hf_greedy, load_hf, relative_error, teacher_forced_logits
from workers.comm import create_group, free_port
from workers.config import ModelConfig, ParallelConfig
from workers.model.checkpoint import CheckpointReader
from workers.model.weights import load_dense_weights, load_expert_shard
from workers.runtime.attention_rank import MicroBatching
from workers.runtime.distributed_experts import DistributedExperts
from workers.runtime.expert_rank import ExpertRank
from workers.runtime.local_build import assemble_attention_rank

CPU = torch.device("cpu")


def _rank_main(
    rank: int, world: int, port: int, model_dir: str, sequences, prompt_lens, max_bytes, micro_batches, coordinators,
    redundant, errors,
) -> None:
    """Coordinator c (rank < coordinators) runs sequences c, c + coordinators, ...; coordinator 1 prefills in
    chunks of 5, so the coordinators' step counts differ and the one done first joins the other's steps. Expert
    ranks report the rows each of their local experts received."""
    try:
        torch.set_num_threads(1)
        cfg = ModelConfig.from_model_dir(model_dir)
        parallel = ParallelConfig.contiguous(num_experts=cfg.num_local_experts, num_workers=world - coordinators,
                                             collective_timeout_s=60, single_collective_max_bytes=max_bytes,
                                             num_coordinators=coordinators, redundant_experts=redundant)
        reader = CheckpointReader(model_dir)
        handle = create_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                              timeout_s=60)
        if rank < coordinators:
            experts = DistributedExperts(parallel, group=handle.group, device=CPU, top_k=cfg.num_experts_per_tok,
                                         row_bytes=cfg.hidden_size * torch.float32.itemsize,
                                         num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size)
            dense = load_dense_weights(reader, cfg, dtype=torch.float32, device=CPU)
            attention = assemble_attention_rank(cfg, dense, experts, num_blocks=128, block_size=4,
                                                micro_batching=MicroBatching(micro_batches=micro_batches, min_tokens=1))
            mine = list(range(rank, len(sequences), coordinators))
            logits = teacher_forced_logits(attention, [sequences[i] for i in mine], [prompt_lens[i] for i in mine],
                                           prefill_chunk=5 if rank == 1 else None)
            experts.stop()
            errors.put(("logits", dict(zip(mine, [t.clone() for t in logits], strict=True))))
        else:
            shard = load_expert_shard(reader, cfg, parallel.experts_of_worker(rank - coordinators),
                                      dtype=torch.float32, device=CPU)
            expert_rank = ExpertRank(shard, group=handle.group, device=CPU, max_local_experts=parallel.max_local_experts,
                                     hidden_size=cfg.hidden_size, num_coordinators=coordinators,
                                     num_experts=cfg.num_local_experts)
            expert_rank.run()
            local_rows = expert_rank.rows_per_expert.sum(0)[list(shard.expert_ids)]
            errors.put(("rows", {rank - coordinators: local_rows.tolist()}))
        handle.destroy()
    except Exception:
        errors.put(("error", f"rank {rank}: {traceback.format_exc()}"))


def _run_ranks(model_dir, num_workers: int, coordinators: int, max_bytes: int, micro_batches: int, seed: int,
               redundant: int = 0, rows: dict[int, list[int]] | None = None):
    """Every rank in its own process; returns the reference [(tokens, logits)] and each sequence's logits, and
    fills `rows` (when given) with each worker's rows per local expert over every layer."""
    hf = load_hf(model_dir)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (6, 17, 11)]
    reference = [hf_greedy(hf, p, 12) for p in prompts]
    sequences = [p + toks for p, (toks, _) in zip(prompts, reference, strict=True)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    world = coordinators + num_workers
    port = free_port()
    prompt_lens = [len(p) for p in prompts]
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, str(model_dir), sequences, prompt_lens, max_bytes,
                                            micro_batches, coordinators, redundant, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    logits: dict[int, torch.Tensor] = {}
    try:
        for _ in range(world):
            kind, payload = results.get(timeout=200)
            assert kind in ("logits", "rows"), payload
            if kind == "logits":
                logits |= payload
            elif rows is not None:
                rows |= payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return reference, [logits[i] for i in range(len(reference))]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("micro_batches", [1, 2], ids=["one-batch", "ping-pong"])
@pytest.mark.parametrize("num_workers", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "max_bytes", [1 << 20, 0], ids=["counts-with-rows", "split-sizes-first"]
)  # tiny8 steps all fit 1 MiB: the first runs every step in one collective, the second never
def test_expert_parallel_logits_match_transformers(tiny8, num_workers, max_bytes, micro_batches):
    reference, logits = _run_ranks(tiny8, num_workers, 1, max_bytes, micro_batches, seed=num_workers)
    for (_, ref_logits), got in zip(reference, logits, strict=True):
        assert relative_error(got, ref_logits) < 1e-4


@pytest.mark.timeout(240)
@pytest.mark.parametrize("micro_batches", [1, 2], ids=["one-batch", "ping-pong"])
@pytest.mark.parametrize("num_workers", [1, 2, 4])
def test_two_coordinators_share_the_expert_ranks_and_match_transformers(tiny8, num_workers, micro_batches):
    """Coordinator 0 runs two sequences (two micro-batches with ping-pong), coordinator 1 one, prefilled in
    chunks: their steps and micro-batch counts differ, and every worker receives rows from both."""
    reference, logits = _run_ranks(tiny8, num_workers, 2, 1 << 20, micro_batches, seed=10 + num_workers)
    for (_, ref_logits), got in zip(reference, logits, strict=True):
        assert relative_error(got, ref_logits) < 1e-4


def _assert_every_copy_served(model_dir, num_workers: int, redundant: int, rows: dict[int, list[int]],
                              routed_rows: int) -> None:
    cfg = ModelConfig.from_model_dir(model_dir)
    parallel = ParallelConfig.contiguous(num_experts=cfg.num_local_experts, num_workers=num_workers,
                                         redundant_experts=redundant)
    assert sum(map(sum, rows.values())) == routed_rows
    for expert, workers in enumerate(parallel.workers_of_expert):
        served = [rows[w][parallel.experts_of_worker(w).index(expert)] for w in workers]
        assert all(served), f"expert {expert}: rows per copy {served} on workers {workers}"


def _routed_rows(model_dir, reference, prompt_lens: tuple[int, ...] = (6, 17, 11)) -> int:
    cfg = ModelConfig.from_model_dir(model_dir)
    tokens = sum(n + len(toks) - 1 for n, (toks, _) in zip(prompt_lens, reference, strict=True))
    return tokens * cfg.num_experts_per_tok * cfg.num_hidden_layers


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("num_workers", "redundant", "coordinators", "micro_batches", "max_bytes"),
    [
        (2, 8, 1, 1, 1 << 20),  # every expert on both workers
        (3, 1, 1, 2, 1 << 20),
        (3, 1, 1, 1, 0),
        (4, 2, 1, 1, 1 << 20),
        (4, 8, 1, 2, 0),
        (2, 2, 2, 2, 1 << 20),
        (3, 1, 2, 1, 1 << 20),
        (4, 8, 2, 2, 1 << 20),
    ],
    ids=lambda v: str(v),
)
def test_redundant_experts_match_transformers(tiny8, num_workers, redundant, coordinators, micro_batches, max_bytes):
    """Replicated experts' rows are split between their copies (each copy receives some) and the logits
    still match transformers: the tokens never depend on the split."""
    rows: dict[int, list[int]] = {}
    reference, logits = _run_ranks(tiny8, num_workers, coordinators, max_bytes, micro_batches,
                                   seed=20 + num_workers + redundant, redundant=redundant, rows=rows)
    for (_, ref_logits), got in zip(reference, logits, strict=True):
        assert relative_error(got, ref_logits) < 1e-4
    _assert_every_copy_served(tiny8, num_workers, redundant, rows, _routed_rows(tiny8, reference))


@pytest.mark.timeout(240)
def test_more_workers_than_experts_match_transformers(tiny_checkpoints):
    """4 experts (top-1) + 2 copies on 5 workers: experts 0 and 1 live on two workers each."""
    model = tiny_checkpoints["top1_mha"]
    rows: dict[int, list[int]] = {}
    reference, logits = _run_ranks(model, 5, 1, 1 << 20, 1, seed=31, redundant=2, rows=rows)
    for (_, ref_logits), got in zip(reference, logits, strict=True):
        assert relative_error(got, ref_logits) < 1e-4
    _assert_every_copy_served(model, 5, 2, rows, _routed_rows(model, reference))
