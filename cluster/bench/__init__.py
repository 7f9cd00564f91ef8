"""`mixserve bench`: offline and online-serving benchmarks of mixserve against transformers.

Everything compared is measured in the same process run, on the same prompts, dtype and thread count,
after a warm-up. Results are frozen dataclasses written as JSON, printed as a table and plotted.
Performance is reported here, never asserted. Serving code never imports this package.

  workload.py  prompts, random checkpoints, the setup every engine shares
  machine.py   the machine: description, load, matmul rate, copy bandwidth; the floors they set
  runners.py   the engines over the workload: in-process, Ray, transformers; CPU seconds by process
  offline.py   `bench offline`: every engine over one batch, per round; ratios and floors
  load.py      `bench serve`'s and `bench mixed`'s client: gRPC load generator, per-request traces, latency, /metrics
  serve.py     `bench serve`: a gateway per worker count, a concurrency or request-rate sweep
  capacity.py  `bench capacity`: projected decode tok/s per GPU (H100/H200, M:N, nodes), the CPU overlap check
  mixed.py     `bench mixed`: long prompts arriving while short streams decode, against the groups apart
  report.py    result records, ratios, JSON, text and Markdown tables
  plot.py      latency against throughput (PNG)
  cli.py       the `mixserve bench` arguments and the run
  gpu.py       scripts/gpu_check.py's parity and decode-step benchmark (no Ray, no gRPC)
"""
