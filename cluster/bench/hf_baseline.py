"""The transformers baseline: `MixtralForCausalLM.generate`, batched, greedy, every sequence forced to
exactly `output_len` new tokens (min_new_tokens = max_new_tokens), left padding with an attention mask.

transformers is a test-only dependency of mixserve; it is imported here only when a baseline runs.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.bench.cpu_time import cpu_delta, cpu_seconds
from cluster.bench.engines import EngineSetup, Steps, TimedRuns
from cluster.bench.progress import token_bar
from cluster.bench.workload import Workload
from workers.config import ModelConfig


@dataclass(frozen=True)
class BatchOutput:
    token_ids: list[list[int]]  # new tokens per sequence
    start: float  # perf_counter when generate was called
    end: float  # perf_counter when it returned
    step_times: tuple[float, ...]  # perf_counter after each generated position (all sequences at once)


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def implementation_notes(model) -> dict[str, str]:
    cfg = model.config
    return {"attn_implementation": str(getattr(cfg, "_attn_implementation", None)),
            "experts_implementation": str(getattr(cfg, "_experts_implementation", None)),
            "batching": "one generate call per batch, left padding with attention mask"}


def _step_clock(on_step: Callable[[int], None] | None):
    from transformers import StoppingCriteria

    class StepClock(StoppingCriteria):
        """Never stops; records when each position was generated."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            self.times.append(time.perf_counter())
            if on_step is not None:
                on_step(input_ids.shape[0])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepClock()


def left_padded(prompts: list[tuple[int, ...]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids_BL = torch.full((len(prompts), longest), pad_id, dtype=torch.int64)
    mask_BL = torch.zeros((len(prompts), longest), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids_BL[row, longest - len(prompt):] = torch.tensor(prompt)
        mask_BL[row, longest - len(prompt):] = 1
    return ids_BL.to(device), mask_BL.to(device)


@torch.inference_mode()
def generate_batch(model, cfg: ModelConfig, prompts: list[tuple[int, ...]], output_len: int,
                   on_step: Callable[[int], None] | None = None) -> BatchOutput:
    from transformers import GenerationConfig, StoppingCriteriaList

    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    pad = eos if eos is not None else 0
    ids_BL, mask_BL = left_padded(prompts, pad, model.device)
    gen_cfg = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, num_beams=1,
                               pad_token_id=pad, eos_token_id=eos, use_cache=True)
    clock = _step_clock(on_step)
    start = time.perf_counter()
    out_BT = model.generate(input_ids=ids_BL, attention_mask=mask_BL, generation_config=gen_cfg,
                            stopping_criteria=StoppingCriteriaList([clock]))
    new_BO = out_BT[:, ids_BL.shape[1]:].tolist()
    return BatchOutput(token_ids=new_BO, start=start, end=time.perf_counter(), step_times=tuple(clock.times))


def run_transformers(cfg: ModelConfig, setup: EngineSetup, workload: Workload, prompts: list[tuple[int, ...]],
                     timed: TimedRuns) -> None:
    """Loads the model, warms it up, and adds one timed generate over the whole workload (one batch) to `timed`."""
    torch.set_num_threads(setup.threads_per_rank)
    model = load_model(setup.model_dir, setup.dtype, setup.device)
    timed.notes = implementation_notes(model)
    generate_batch(model, cfg, prompts, setup.warmup_tokens)
    timed.sample_load()
    cpu_before = cpu_seconds()
    with token_bar(workload.output_tokens, "transformers generate", enabled=setup.progress) as bar:
        out = generate_batch(model, cfg, prompts, workload.output_len, bar.update)
    timed.add_cpu(cpu_delta(cpu_before, cpu_seconds()))
    timed.add(out.end - out.start, Steps(), out.token_ids)
    timed.steps += len(out.step_times)
    timed.prefill_seconds += out.step_times[0] - out.start
    timed.decode_seconds += out.end - out.step_times[0]
    del model
    gc.collect()
