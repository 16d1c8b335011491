"""trtserve-bench: closed-loop load at fixed concurrency levels against a trtserve (or Triton) gRPC server.

Modules, one job each: `tokens` (a tokenizer reached over the native API or
loaded locally, and prompts of an exact token length), `workloads` (what is
sent: synthetic, shared-prefix, JSONL with images, multi-turn), `backends`
(one request over the native API or the KServe `ensemble`), `loadgen` (c
clients, each with one request in flight), `summary` (per-level metrics),
`server_stats` (the server's Prometheus counters), `baseline` (HF transformers
static batches in-process), `report` (table, JSON, markdown), `plot` (PNG),
`cli` (the `trtserve-bench` command).
"""
