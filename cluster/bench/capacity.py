"""Capacity model: the decode throughput mixserve's layout should reach per GPU, from published GPU and
interconnect rates, serial and with the ping-pong overlap; and the same overlap arithmetic applied to a recorded
CPU benchmark, so that the projection can be checked where we can measure. docs/SCALING.md explains the tables.

It knows no torch, Ray or engine code: it is arithmetic over a model shape, a GPU, a fabric and a placement of
M coordinators and N expert GPUs on nodes, for one decode step in which every coordinator runs B tokens with S
keys each. Per layer and per (micro-)batch:

  attention (coordinator)  max(FLOPs / FLOP rate, bytes / HBM rate): QKV, O and router weights; K/V of S keys
  dispatch                 latency + the slower of the NVLink and the RDMA share of the B·K rows (D·2 bytes
                           each); the busiest sender or receiver sets it
  experts (expert GPU)     max(FLOPs / FLOP rate, bytes / HBM rate): the rows' FLOPs; the weights of the local
                           experts the rows hit (expected under uniform routing)
  combine                  as dispatch, the other way

Serial: a step is L·(a + d + x + c) + lm_head. Ping-pong (two micro-batches of B/2, half-batch times a, d, x,
c): a layer takes max(2a, 2d, 2x, 2c, a + d + x + c); each resource does both halves, and one half's chain has
to come round before its next layer. An engine splits a step only when that is faster, so the projection takes
the smaller. Left out: prefill, host and launch overhead, SMs that communication takes, congestion.

Shapes: M coordinators, N expert GPUs, B tokens per coordinator per step, S keys per sequence, L layers, D model
dim, F ffn dim, E experts, K top-k, H / Hkv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    name: str
    hidden: int  # D
    intermediate: int  # F
    layers: int  # L
    experts: int  # E
    top_k: int  # K
    heads: int  # H
    kv_heads: int  # Hkv
    head_dim: int  # Dh
    vocab: int  # V
    element_bytes: int = 2  # bf16

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "experts", "top_k", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be positive")
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds experts ({self.experts})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) is not a multiple of kv_heads ({self.kv_heads})")

    @property
    def attention_params(self) -> int:  # one layer: fused QKV and the output projection
        return self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden

    @property
    def expert_params(self) -> int:  # one expert of one layer: gate, up, down
        return 3 * self.hidden * self.intermediate

    @property
    def kv_bytes_per_token(self) -> int:  # one layer's K and V for one token
        return 2 * self.kv_heads * self.head_dim * self.element_bytes

    @property
    def dense_bytes(self) -> int:  # a coordinator's weights: attention, router, norms per layer; embedding, lm_head
        per_layer = self.attention_params + self.hidden * self.experts + 2 * self.hidden
        return (self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden) * self.element_bytes


MIXTRAL_8X7B = ModelShape(name="Mixtral-8x7B", hidden=4096, intermediate=14336, layers=32, experts=8, top_k=2,
                          heads=32, kv_heads=8, head_dim=128, vocab=32000)


@dataclass(frozen=True, kw_only=True)
class Gpu:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s (the datasheet's "with sparsity" figure halved)
    hbm_bytes_per_s: float
    memory_bytes: float
    flops_efficiency: float = 0.7  # assumed: share of the peak a decode-sized grouped GEMM reaches
    bandwidth_efficiency: float = 0.8  # assumed: share of the HBM peak a weight- or KV-streaming kernel reaches
    memory_utilization: float = 0.9  # share of memory given to weights and KV cache

    def seconds(self, flops: float, bytes_: float) -> float:
        """Roofline time of a kernel: the slower of its FLOPs and its HBM bytes at the achievable rates."""
        return max(flops / (self.peak_flops * self.flops_efficiency),
                   bytes_ / (self.hbm_bytes_per_s * self.bandwidth_efficiency))


# NVIDIA's H100 SXM and H200 SXM specifications (docs/SCALING.md cites them): BF16 tensor core 1,979 TFLOPS with
# sparsity (989.4 dense) on both; HBM 3.35 TB/s and 80 GB (H100), 4.8 TB/s and 141 GB (H200)
H100_SXM = Gpu(name="H100 SXM", peak_flops=989.4e12, hbm_bytes_per_s=3.35e12, memory_bytes=80e9)
H200_SXM = Gpu(name="H200 SXM", peak_flops=989.4e12, hbm_bytes_per_s=4.8e12, memory_bytes=141e9)


@dataclass(frozen=True, kw_only=True)
class Fabric:
    name: str
    nvlink_bytes_per_s: float  # achieved, one direction, per GPU
    rdma_bytes_per_s: float  # achieved, one direction, per GPU (one NIC each)
    latency_s: float  # fixed cost of one dispatch or one combine
    gpus_per_node: int = 8

    def all_to_all_seconds(self, bytes_: float, same_node: float, cross_node: float) -> float:
        """One rank's side of an all-to-all moving `bytes_`: the share `same_node` over NVLink, `cross_node`
        over the NIC (both at once), the rest stays on the GPU."""
        return self.latency_s + max(bytes_ * same_node / self.nvlink_bytes_per_s,
                                    bytes_ * cross_node / self.rdma_bytes_per_s)


# Latency and RDMA rate: a fit of this formula to DeepEP's low-latency table (DEEPEP_LOW_LATENCY_US, within 8%).
# NVLink: 0.8 of NVLink 4's 450 GB/s a direction, the share DeepEP V2 reaches of B200's 900 (726-740 GB/s).
HGX_HOPPER = Fabric(name="HGX H100/H200: NVLink 4, one 400G NIC per GPU", nvlink_bytes_per_s=360e9,
                    rdma_bytes_per_s=45e9, latency_s=35e-6)
DEEPEP_H800 = replace(HGX_HOPPER, name="H800, one CX7 400G per GPU (DeepEP's testbed)", nvlink_bytes_per_s=160e9)

# DeepEP V1 low-latency kernels, H800 + CX7 400G (deepseek-ai/DeepEP docs/legacy.md): 128 tokens per rank, hidden
# 7168, top-8, FP8 dispatch (7168 bytes + 56 fp32 scales a row), BF16 combine. EP size: (dispatch µs, combine µs).
DEEPEP_LOW_LATENCY_US = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314), 128: (192, 369),
                         256: (194, 360)}


def deepep_check(fabric: Fabric = DEEPEP_H800) -> list[tuple[int, str, float, float]]:
    """(EP size, "dispatch" | "combine", published seconds, modelled seconds) for DeepEP's published setting."""
    rows = 128 * 8
    out = []
    for ep, (dispatch_us, combine_us) in DEEPEP_LOW_LATENCY_US.items():
        local = min(ep, fabric.gpus_per_node)
        same, cross = (local - 1) / ep, (ep - local) / ep
        stages = (("dispatch", 7168 + 7168 // 128 * 4, dispatch_us), ("combine", 7168 * 2, combine_us))
        for kind, row_bytes, us in stages:
            out.append((ep, kind, us * 1e-6, fabric.all_to_all_seconds(rows * row_bytes, same, cross)))
    return out


def _spread(count: int, nodes: int) -> tuple[int, ...]:
    base, extra = divmod(count, nodes)
    return tuple(base + (i < extra) for i in range(nodes))


@dataclass(frozen=True, kw_only=True)
class Placement:
    """M coordinators and N expert GPUs on `nodes` nodes: expert GPUs spread evenly from the first node,
    coordinators from the last, so that the nodes with fewer expert GPUs take the extra coordinators."""

    coordinators: int  # M
    expert_gpus: int  # N
    nodes: int
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        for name in ("coordinators", "expert_gpus", "nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be positive")
        if self.nodes > self.coordinators + self.expert_gpus:
            raise ValueError(f"nodes ({self.nodes}) exceeds the GPUs placed ({self.coordinators}+{self.expert_gpus})")
        for node, (n, m) in enumerate(zip(self.experts_per_node, self.coordinators_per_node, strict=True)):
            if n + m > self.gpus_per_node:
                raise ValueError(f"node {node} would hold {n + m} GPUs, more than gpus_per_node ({self.gpus_per_node})")

    @property
    def experts_per_node(self) -> tuple[int, ...]:
        return _spread(self.expert_gpus, self.nodes)

    @property
    def coordinators_per_node(self) -> tuple[int, ...]:
        return _spread(self.coordinators, self.nodes)[::-1]

    def send_fractions(self) -> tuple[float, float]:
        """(same node, other nodes): shares of the rows of the coordinator that sends most across nodes."""
        local = min(n for n, m in zip(self.experts_per_node, self.coordinators_per_node, strict=True) if m)
        return local / self.expert_gpus, 1 - local / self.expert_gpus

    def receive_fractions(self) -> tuple[float, float]:
        """(same node, other nodes): shares of the rows of the expert GPU that receives most across nodes."""
        local = min(m for n, m in zip(self.experts_per_node, self.coordinators_per_node, strict=True) if n)
        return local / self.coordinators, 1 - local / self.coordinators

    def cross_node_share(self) -> float:
        """The share of all routed rows that cross a node boundary (uniform routing)."""
        pairs = zip(self.experts_per_node, self.coordinators_per_node, strict=True)
        return sum(m * (1 - n / self.expert_gpus) for n, m in pairs) / self.coordinators


def experts_per_gpu(shape: ModelShape, expert_gpus: int) -> tuple[int, int]:
    """(experts each expert GPU holds, replicas of each expert): E/N experts, or for N > E one expert on N/E GPUs."""
    if shape.experts % expert_gpus == 0:
        return shape.experts // expert_gpus, 1
    if expert_gpus % shape.experts == 0:
        return 1, expert_gpus // shape.experts
    raise ValueError(f"expert_gpus ({expert_gpus}) neither divides nor is a multiple of experts ({shape.experts})")


@dataclass(frozen=True, kw_only=True)
class LayerTimes:
    """Seconds of one layer's four stages for one (micro-)batch."""

    attention: float
    dispatch: float
    experts: float
    combine: float

    @property
    def serial(self) -> float:
        return self.attention + self.dispatch + self.experts + self.combine


def pingpong_seconds(half: LayerTimes) -> float:
    """One layer with two micro-batches in flight, given one micro-batch's stage times."""
    a, d, x, c = half.attention, half.dispatch, half.experts, half.combine
    return max(2 * a, 2 * d, 2 * x, 2 * c, a + d + x + c)


def attention_flops_bytes(shape: ModelShape, tokens: float, context: int) -> tuple[float, float]:
    weights = shape.attention_params + shape.hidden * shape.experts  # the router's too
    flops = 2 * tokens * weights + 4 * tokens * context * shape.heads * shape.head_dim  # projections, QKᵀ and PV
    return flops, weights * shape.element_bytes + tokens * context * shape.kv_bytes_per_token


def expert_flops_bytes(shape: ModelShape, placement: Placement, tokens: float,
                       imbalance: float = 1.0) -> tuple[float, float]:
    """One expert GPU's layer: M·tokens tokens routed, rows spread evenly (times `imbalance` on the busiest)."""
    local, replicas = experts_per_gpu(shape, placement.expert_gpus)
    picked = placement.coordinators * tokens
    rows = picked * shape.top_k / placement.expert_gpus * imbalance
    hit = local * (1 - (1 - shape.top_k / (shape.experts * replicas)) ** picked)
    flops = 2 * rows * shape.expert_params
    return flops, (hit * shape.expert_params + 2 * rows * shape.hidden) * shape.element_bytes


def all_to_all_bytes(shape: ModelShape, tokens: float) -> float:
    """What one coordinator sends in one dispatch (and receives in one combine): its B·K rows."""
    return tokens * shape.top_k * shape.hidden * shape.element_bytes


def layer_times(shape: ModelShape, gpu: Gpu, fabric: Fabric, placement: Placement, *, tokens: float, context: int,
                imbalance: float = 1.0) -> LayerTimes:
    sent = all_to_all_bytes(shape, tokens)
    received = sent * placement.coordinators / placement.expert_gpus * imbalance
    exchange = max(fabric.all_to_all_seconds(sent, *placement.send_fractions()),
                   fabric.all_to_all_seconds(received, *placement.receive_fractions()))
    return LayerTimes(attention=gpu.seconds(*attention_flops_bytes(shape, tokens, context)), dispatch=exchange,
                      experts=gpu.seconds(*expert_flops_bytes(shape, placement, tokens, imbalance)), combine=exchange)


@dataclass(frozen=True, kw_only=True)
class Projection:
    gpu: str
    placement: Placement
    batch: int  # B, per coordinator
    context: int  # S
    full: LayerTimes  # one layer, the whole batch
    half: LayerTimes  # one layer, one micro-batch of B/2
    serial_step_s: float
    pingpong_step_s: float
    all_to_all_bytes_per_step: float  # dispatch + combine, every coordinator, every layer
    cross_node_bytes_per_step: float
    fits: bool  # weights and KV within memory_utilization of each GPU

    @property
    def step_s(self) -> float:  # what an engine that splits only when it pays would take
        return min(self.serial_step_s, self.pingpong_step_s)

    def tokens_per_s_per_gpu(self, *, overlap: bool = True) -> float:
        step = self.step_s if overlap else self.serial_step_s
        p = self.placement
        return p.coordinators * self.batch / step / (p.coordinators + p.expert_gpus)

    @property
    def bound(self) -> str:
        """What sets a layer's time: the ping-pong's binding term, or the serial stage that takes longest."""
        h = self.half
        if self.pingpong_step_s < self.serial_step_s:
            terms = {"attention": 2 * h.attention, "experts": 2 * h.experts, "exchange": 2 * max(h.dispatch, h.combine),
                     "chain": h.serial}
        else:
            f = self.full
            terms = {"attention": f.attention, "experts": f.experts, "exchange": f.dispatch + f.combine}
        return max(terms, key=terms.__getitem__)


def project(shape: ModelShape, gpu: Gpu, fabric: Fabric, placement: Placement, *, batch: int, context: int,
            imbalance: float = 1.0) -> Projection:
    """Project one decode step of `batch` tokens per coordinator, each attending to `context` keys."""
    if batch < 2:
        raise ValueError(f"batch ({batch}) must be at least 2 to split into two micro-batches")
    full = layer_times(shape, gpu, fabric, placement, tokens=batch, context=context, imbalance=imbalance)
    half = layer_times(shape, gpu, fabric, placement, tokens=batch / 2, context=context, imbalance=imbalance)

    def head(tokens: float) -> float:  # final norm and lm_head, on the coordinator
        return gpu.seconds(2 * tokens * shape.vocab * shape.hidden, shape.vocab * shape.hidden * shape.element_bytes)

    # ping-pong: the second micro-batch starts one attention later and ends that much after the first
    pingpong = shape.layers * pingpong_seconds(half) + half.attention + 2 * head(batch / 2)
    volume = 2 * shape.layers * placement.coordinators * all_to_all_bytes(shape, batch)
    local, _ = experts_per_gpu(shape, placement.expert_gpus)
    budget = gpu.memory_bytes * gpu.memory_utilization
    kv = batch * context * shape.layers * shape.kv_bytes_per_token
    experts = local * shape.layers * shape.expert_params * shape.element_bytes
    fits = shape.dense_bytes + kv <= budget and experts <= budget
    return Projection(gpu=gpu.name, placement=placement, batch=batch, context=context, full=full, half=half,
                      serial_step_s=shape.layers * full.serial + head(batch), pingpong_step_s=pingpong,
                      all_to_all_bytes_per_step=volume, cross_node_bytes_per_step=volume * placement.cross_node_share(),
                      fits=fits)


# --- this machine: the same overlap arithmetic against a recorded CPU benchmark ------------------------------------

# One W2 decode step's per-layer trace with 1 expert worker (docs/PERFORMANCE.md, the EPYC Zen 5 session of
# benchmarks/w2_offline.json): attention 3.9 + routing 0.4 ms; dispatch 1.0 ms and 0.4 ms more until the worker's
# experts start; experts 11.8 ms; combine 0.7 ms.
W2_DECODE_LAYER = LayerTimes(attention=4.3e-3, dispatch=1.4e-3, experts=11.8e-3, combine=0.7e-3)


@dataclass(frozen=True, kw_only=True)
class CpuRun:
    """One recorded Ray engine run with expert workers: means over its rounds of seconds summed over the run."""

    label: str
    wall_s: float  # mean of the rounds, as the phases are
    median_s: float
    attention_s: float  # coordinator: attention + routing
    experts_s: float  # the busiest expert worker's experts
    exchange_s: float  # the coordinator's dispatch + combine less the experts: transfers and hand-offs
    other_s: float  # the rest: sampling, scheduling, lm_head
    cpu_s: float  # process time of every process of the run
    cores: int
    threads_per_rank: int
    in_process_median_s: float  # the in-process engine of the same file


def read_cpu_run(path: Path, *, workers: int = 1) -> CpuRun:
    data = json.loads(Path(path).read_text())
    run = next(r for r in data["runs"] if r["engine"] == "ray" and r["workers"] == workers)
    reference = next(r for r in data["runs"] if r["engine"] == "in-process")
    phases = run["phase_seconds"]
    experts = max(w["experts"] for w in run["worker_phase_seconds"])
    attention = phases["attention"] + phases["routing"]
    layers = attention + phases["dispatch"] + phases["combine"]
    wall = statistics.fmean(run["run_seconds"])
    return CpuRun(label=run["label"], wall_s=wall, median_s=run["seconds"], attention_s=attention, experts_s=experts,
                  exchange_s=max(0.0, layers - attention - experts), other_s=max(0.0, wall - layers),
                  cpu_s=sum(run["cpu_seconds"].values()), cores=data["meta"]["logical_cpus"],
                  threads_per_rank=int(data["settings"]["threads_per_rank"]), in_process_median_s=reference["seconds"])


@dataclass(frozen=True, kw_only=True)
class OverlapBound:
    serial_s: float  # as measured (or the serial layer)
    schedule_s: float  # the ping-pong schedule if every rank had its own cores
    cores_s: float  # all the CPU work spread over every core of the machine

    @property
    def projected_s(self) -> float:  # the ping-pong can beat neither
        return max(self.schedule_s, self.cores_s)


def run_overlap_bound(run: CpuRun) -> OverlapBound:
    """The whole run in two micro-batches: attention and experts halve, the hand-offs (latency-bound on this host)
    do not. Optimistic: it takes the ping-pong's max over the run's sums, not over each layer."""
    half = LayerTimes(attention=run.attention_s / 2, dispatch=run.exchange_s / 2, experts=run.experts_s / 2,
                      combine=run.exchange_s / 2)
    return OverlapBound(serial_s=run.wall_s, schedule_s=run.other_s + pingpong_seconds(half),
                        cores_s=run.cpu_s / run.cores)


def decode_layer_bound(layer: LayerTimes, *, attention_scale: float, experts_scale: float, cores: int,
                       threads_per_rank: int) -> OverlapBound:
    """One layer split in two: a micro-batch's attention and experts take `scale` of the whole batch's time (0.5
    when time follows tokens, more where weight reads or per-op costs stay); the hand-offs stay. A computing rank
    keeps min(threads, cores) cores busy."""
    half = replace(layer, attention=layer.attention * attention_scale, experts=layer.experts * experts_scale)
    work = min(threads_per_rank, cores) * 2 * (half.attention + half.experts)
    return OverlapBound(serial_s=layer.serial, schedule_s=pingpong_seconds(half), cores_s=work / cores)


def roofline_half_scales(path: Path) -> tuple[float, float]:
    """(attention, experts): a half decode batch's roofline time over the whole batch's, at the file's measured
    matmul rate and copy bandwidth, for its model and dtype, batch and mean decode context."""
    data = json.loads(Path(path).read_text())
    m, w = data["model"], data["workload"]
    shape = ModelShape(name="bench", hidden=m["hidden_size"], intermediate=m["intermediate_size"], layers=m["layers"],
                       experts=m["experts"], top_k=m["top_k"], heads=m["heads"], kv_heads=m["kv_heads"],
                       head_dim=m["hidden_size"] // m["heads"], vocab=m["vocab_size"],
                       element_bytes=4 if data["settings"]["dtype"] == "float32" else 2)
    cpu = Gpu(name=data["meta"]["cpu"], peak_flops=data["compute_floor"]["matmul"]["best"],
              hbm_bytes_per_s=data["roofline_floor"]["bandwidth"]["best"], memory_bytes=0.0, flops_efficiency=1.0,
              bandwidth_efficiency=1.0)
    batch, context = w["num_prompts"], w["input_len"] + w["output_len"] // 2
    alone = Placement(coordinators=1, expert_gpus=1, nodes=1)

    def attention(tokens: float) -> float:
        return cpu.seconds(*attention_flops_bytes(shape, tokens, context))

    def experts(tokens: float) -> float:
        return cpu.seconds(*expert_flops_bytes(shape, alone, tokens))

    return attention(batch / 2) / attention(batch), experts(batch / 2) / experts(batch)


# --- Markdown tables for docs/SCALING.md (python -m cluster.bench.capacity) -----------------------------------------

def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def _grid_cell(shape: ModelShape, gpu: Gpu, fabric: Fabric, m: int, n: int, k: int, *, batch: int,
               context: int) -> str:
    try:
        placement = Placement(coordinators=m, expert_gpus=n, nodes=k, gpus_per_node=fabric.gpus_per_node)
    except ValueError:
        return "–"
    p = project(shape, gpu, fabric, placement, batch=batch, context=context)
    return f"{p.tokens_per_s_per_gpu():,.0f} / {p.tokens_per_s_per_gpu(overlap=False):,.0f}" if p.fits else "no fit"


def grid_table(shape: ModelShape, gpu: Gpu, fabric: Fabric, *, batch: int, context: int,
               coordinators: tuple[int, ...] = (1, 2, 4), expert_gpus: tuple[int, ...] = (2, 4, 8, 16),
               nodes: tuple[int, ...] = (1, 2, 3, 4)) -> str:
    """tok/s per GPU, overlapped / serial, for each (M, N) and node count; "–" where the GPUs do not fit."""
    return _table(["M", "N", *(f"{k} node{'s' * (k > 1)}" for k in nodes)],
                  [[str(m), str(n), *(_grid_cell(shape, gpu, fabric, m, n, k, batch=batch, context=context)
                                      for k in nodes)] for m in coordinators for n in expert_gpus])


def sweep_table(shape: ModelShape, gpu: Gpu, fabric: Fabric, placement: Placement, *, batches: tuple[int, ...],
                contexts: tuple[int, ...]) -> str:
    rows = []
    for s in contexts:
        for b in batches:
            p = project(shape, gpu, fabric, placement, batch=b, context=s)
            f = p.full
            rows.append([str(s), str(b), f"{f.attention * 1e6:.0f}", f"{f.experts * 1e6:.0f}",
                         f"{f.dispatch * 1e6:.0f}", f"{p.serial_step_s * 1e3:.1f}", f"{p.pingpong_step_s * 1e3:.1f}",
                         f"{p.tokens_per_s_per_gpu(overlap=False):,.0f}", f"{p.tokens_per_s_per_gpu():,.0f}", p.bound,
                         f"{p.all_to_all_bytes_per_step / 1e6:,.0f}", "yes" if p.fits else "no"])
    return _table(["S", "B", "attention µs", "experts µs", "dispatch µs", "serial ms", "ping-pong ms",
                   "tok/s/GPU serial", "tok/s/GPU overlapped", "bound", "all-to-all MB/step", "fits"], rows)


def sensitivity_table(shape: ModelShape, gpu: Gpu, fabric: Fabric, placement: Placement, *, batch: int,
                      context: int) -> str:
    cases = (("as tabled", gpu, fabric, 1.0),
             ("all-to-all latency 100 µs, not 35", gpu, replace(fabric, latency_s=100e-6), 1.0),
             ("RDMA 25 GB/s, not 45", gpu, replace(fabric, rdma_bytes_per_s=25e9), 1.0),
             ("busiest expert GPU gets 1.3× the mean rows", gpu, fabric, 1.3),
             ("peak FLOP/s and HBM rates (efficiency 1.0)",
              replace(gpu, flops_efficiency=1.0, bandwidth_efficiency=1.0), fabric, 1.0))
    rows = []
    for name, g, f, imbalance in cases:
        p = project(shape, g, f, placement, batch=batch, context=context, imbalance=imbalance)
        rows.append([name, f"{p.tokens_per_s_per_gpu(overlap=False):,.0f}", f"{p.tokens_per_s_per_gpu():,.0f}",
                     p.bound])
    return _table(["case", "tok/s/GPU serial", "tok/s/GPU overlapped", "bound"], rows)


def deepep_table(fabric: Fabric = DEEPEP_H800) -> str:
    return _table(["EP", "stage", "DeepEP µs", "model µs", "model / DeepEP"],
                  [[str(ep), kind, f"{pub * 1e6:.0f}", f"{mod * 1e6:.0f}", f"{mod / pub:.2f}"]
                   for ep, kind, pub, mod in deepep_check(fabric)])


def cpu_table(path: Path, *, decode_layer: LayerTimes | None = None) -> str:
    """The whole run's bounds; with `decode_layer` (a trace from the same machine) the decode layer's too."""
    run = read_cpu_run(path)
    bounds = [("whole run, s", 1.0, run_overlap_bound(run))]
    if decode_layer is not None:
        a, x = roofline_half_scales(path)
        for name, a_scale, x_scale in (("time follows tokens", 0.5, 0.5), (f"roofline scales {a:.2f} / {x:.2f}", a, x)):
            bound = decode_layer_bound(decode_layer, attention_scale=a_scale, experts_scale=x_scale, cores=run.cores,
                                       threads_per_rank=run.threads_per_rank)
            bounds.append((f"decode layer, {name}, ms", 1e3, bound))
    rows = [[name, *(f"{v * unit:.2f}" for v in (b.serial_s, b.schedule_s, b.cores_s, b.projected_s)),
             f"{b.projected_s / b.serial_s:.2f}"] for name, unit, b in bounds]
    return (f"{run.label}: wall {run.wall_s:.2f} s (mean; median {run.median_s:.2f} s), in-process median "
            f"{run.in_process_median_s:.2f} s; attention {run.attention_s:.2f} s, experts {run.experts_s:.2f} s, "
            f"hand-offs {run.exchange_s:.2f} s, other {run.other_s:.2f} s, {run.cpu_s:.2f} CPU-s on {run.cores} "
            "CPUs\n\n" + _table(["case", "serial", "ping-pong schedule", "core budget", "projected",
                                 "projected / serial"], rows))


def main() -> None:
    """Print docs/SCALING.md's tables (run from the repository root: the CPU check reads benchmarks/)."""
    for gpu in (H100_SXM, H200_SXM):
        print(f"\n### {gpu.name}: tok/s per GPU, overlapped / serial (B = 128 per coordinator, S = 2048)\n")
        print(grid_table(MIXTRAL_8X7B, gpu, HGX_HOPPER, batch=128, context=2048))
        for m, n, k in ((4, 4, 1), (4, 8, 2)):
            print(f"\n### {gpu.name}, M = {m}, N = {n}, {k} node{'s' * (k > 1)}\n")
            print(sweep_table(MIXTRAL_8X7B, gpu, HGX_HOPPER, Placement(coordinators=m, expert_gpus=n, nodes=k),
                              batches=(16, 32, 64, 128, 256, 512), contexts=(1024, 4096)))
    for n, k in ((4, 1), (8, 2)):
        print(f"\n### Sensitivity: H100 SXM, M = 4, N = {n}, {k} node(s), B = 128, S = 2048\n")
        print(sensitivity_table(MIXTRAL_8X7B, H100_SXM, HGX_HOPPER, Placement(coordinators=4, expert_gpus=n, nodes=k),
                                batch=128, context=2048))
    print("\n### DeepEP's low-latency table against the exchange formula\n")
    print(deepep_table())
    for path, layer in (("benchmarks/w2_offline.json", W2_DECODE_LAYER),
                        ("benchmarks/2026-12-04-w2-served/offline.json", None)):
        print(f"\n### CPU check: {path}\n")
        print(cpu_table(Path(path), decode_layer=layer))


if __name__ == "__main__":
    main()
