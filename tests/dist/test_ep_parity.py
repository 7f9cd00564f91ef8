"""Expert parallelism without Ray: spawned gloo ranks run the attention rank and 1-4 expert ranks, and the
logits at every prefill and decode position match transformers within 1e-4 (fp32), in one batch and with
every step of two or more sequences split into two ping-pong micro-batches."""

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
from workers.runtime.distributed_experts import DistributedExperts
from workers.runtime.expert_rank import ExpertRank
from workers.runtime.attention_rank import MicroBatching
from workers.runtime.local_build import assemble_attention_rank

CPU = torch.device("cpu")


def _rank_main(
    rank: int, world: int, port: int, model_dir: str, sequences, prompt_lens, max_bytes, micro_batches, errors
) -> None:
    try:
        torch.set_num_threads(1)
        cfg = ModelConfig.from_model_dir(model_dir)
        parallel = ParallelConfig.contiguous(num_experts=cfg.num_local_experts, num_workers=world - 1,
                                             collective_timeout_s=60, single_collective_max_bytes=max_bytes)
        reader = CheckpointReader(model_dir)
        handle = create_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                              timeout_s=60)
        if rank == 0:
            experts = DistributedExperts(parallel, group=handle.group, device=CPU, top_k=cfg.num_experts_per_tok,
                                         row_bytes=cfg.hidden_size * torch.float32.itemsize)
            dense = load_dense_weights(reader, cfg, dtype=torch.float32, device=CPU)
            attention = assemble_attention_rank(cfg, dense, experts, num_blocks=128, block_size=4,
                                                micro_batching=MicroBatching(micro_batches=micro_batches, min_tokens=1))
            logits = teacher_forced_logits(attention, sequences, prompt_lens)
            experts.stop()
            errors.put(("logits", [t.clone() for t in logits]))
        else:
            shard = load_expert_shard(reader, cfg, parallel.experts_of_worker(rank - 1), dtype=torch.float32,
                                      device=CPU)
            ExpertRank(shard, group=handle.group, device=CPU, max_local_experts=parallel.max_local_experts,
                       hidden_size=cfg.hidden_size).run()
        handle.destroy()
    except Exception:
        errors.put(("error", f"rank {rank}: {traceback.format_exc()}"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("micro_batches", [1, 2], ids=["one-batch", "ping-pong"])
@pytest.mark.parametrize("num_workers", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "max_bytes", [1 << 20, 0], ids=["counts-with-rows", "split-sizes-first"]
)  # tiny8 steps all fit 1 MiB: the first runs every step in one collective, the second never
def test_expert_parallel_logits_match_transformers(tiny8, num_workers, max_bytes, micro_batches):
    hf = load_hf(tiny8)
    gen = torch.Generator().manual_seed(num_workers)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (6, 17, 11)]
    reference = [hf_greedy(hf, p, 12) for p in prompts]
    sequences = [p + toks for p, (toks, _) in zip(prompts, reference, strict=True)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    world = num_workers + 1
    port = free_port()
    prompt_lens = [len(p) for p in prompts]
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, str(tiny8), sequences, prompt_lens, max_bytes, micro_batches,
                                            results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        kind, payload = results.get(timeout=200)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert kind == "logits", payload
    for (_, ref_logits), logits in zip(reference, payload, strict=True):
        assert relative_error(logits, ref_logits) < 1e-4
