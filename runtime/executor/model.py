"""The Llama / Qwen2 / Qwen2-VL decoder over a flat packed batch with a paged KV cache.

What it is for: one forward pass, reading exactly the TensorRT-LLM checkpoint
tensors (REFERENCE.md section 3), for any mix of prefill chunks and decode
tokens. Custom ops come from the plugin registry. Qwen2 differs from Llama
only by the qkv bias, so one model class serves both; the Qwen2-VL / 2.5-VL
language model is Qwen2 with M-RoPE ([3, T] positions, `cfg.mrope_section`)
and vision embeddings in place of placeholder token embeddings. Per-step host work is kept small
(issue 13): a float engine runs each layer's gate and up projections as one GEMM, the linears call
addmm / mm directly (on CPU on a contiguous [in, out] weight where that pays, quant_linear.FloatLinear),
RoPE, the KV write and attention are one op on the qkv projection's rows (`OpSet.qkv_attention`: one
compiled call on CPU), and on CPU RoPE and M-RoPE cos / sin come from a per-position table (`RopeTable`,
`MRopeTable`).
Not for: scheduling, sampling, KV block ownership or the vision tower.
"""
from __future__ import annotations

import torch

from plugins.reference.rope import rope_cos_sin, rope_inv_freq
from plugins.registry import OpSet, get_ops
from engine_format.checkpoint_layout import layer_prefix, linear_shapes
from runtime.executor.forward_batch import ForwardBatch
from runtime.executor.kv_quant import kv_byte_tables, paged_attention_quant, write_kv_cache_quant
from runtime.executor.kv_storage import KVStorage
from runtime.executor.quant_linear import FloatLinear, LinearFn, build_linears, concat_float_linears
from engine_format.llm_config import LLMConfig


class DecoderModel:
    def __init__(self, cfg: LLMConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 ops: OpSet | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype: torch.dtype = getattr(torch, cfg.dtype)
        self.ops = ops or get_ops(device)
        self.w = {name: t.to(device) for name, t in weights.items()}
        self.inv_freq = rope_inv_freq(cfg.head_size, cfg.rotary_base, cfg.rotary_scaling).to(device)
        self.mrope_section = cfg.mrope_section
        self.scale = cfg.head_size ** -0.5
        self.q_size = cfg.num_attention_heads * cfg.head_size
        self.kv_size = cfg.num_key_value_heads * cfg.head_size
        self.qkv_sizes = [self.q_size, self.kv_size, self.kv_size]
        # quantized engines: each linear runs its low-precision kernel (runtime/executor/quant_linear.py)
        self.linears = build_linears(cfg, self.w, list(linear_shapes(cfg)), device)
        # the linears hold their re-laid-out tensors: drop the checkpoint's, so a layout copy replaces them
        self.w = {n: t for n, t in self.w.items() if not n.startswith(tuple(f"{b}." for b in self.linears))}
        self.gate_up = self._fuse_gate_up()
        self.gate_up_sizes = [cfg.intermediate_size, cfg.intermediate_size]
        self.lm_head = FloatLinear(self.w.pop("lm_head.weight"), None)
        self.rope_table: RopeTable | None = None
        if device.type == "cpu":
            self.rope_table = (MRopeTable(self.inv_freq, self.dtype, self.mrope_section) if self.mrope_section
                               else RopeTable(self.inv_freq, self.dtype))
        self.kv_algo = cfg.kv_cache_quant_algo
        self.kv_tables = kv_byte_tables(cfg, self.w, self.dtype)      # one-byte cache: each layer's decode table

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVStorage) -> torch.Tensor:
        """Return float32 logits [len(batch.logits_indices), vocab_size]."""
        cfg, w, ops = self.cfg, self.w, self.ops
        # the lookup F.embedding runs (no padding_idx / max_norm), without its Python wrapper and checks:
        # measured in the forward, 1 thread: 26 us against 9 us at 16 tokens
        hidden = w["transformer.vocab_embedding.weight"].index_select(0, batch.token_ids)
        if batch.embed_rows is not None and batch.embeds is not None:
            hidden = hidden.index_copy(0, batch.embed_rows, batch.embeds.to(hidden.dtype))
        cos, sin = self._cos_sin(batch.positions)
        # each residual add is fused with the norm after it (ops.add_rms_norm may update `residual` in place)
        residual, eps = hidden, cfg.norm_epsilon
        x = ops.rms_norm(residual, w[f"{layer_prefix(0)}.input_layernorm.weight"], eps)
        for i in range(cfg.num_hidden_layers):
            p = layer_prefix(i)
            out = self._attention(i, p, x, cos, sin, batch, kv)
            x, residual = ops.add_rms_norm(out, residual, w[f"{p}.post_layernorm.weight"], eps)
            out = self._mlp(i, p, x)
            if i + 1 < cfg.num_hidden_layers:
                x, residual = ops.add_rms_norm(out, residual, w[f"{layer_prefix(i + 1)}.input_layernorm.weight"], eps)
        if batch.logits_indices.shape[0] != batch.num_tokens:    # else every row samples: indices 0..T-1
            out, residual = out.index_select(0, batch.logits_indices), residual.index_select(0, batch.logits_indices)
        hidden, _ = ops.add_rms_norm(out, residual, w["transformer.ln_f.weight"], eps)
        logits = self.lm_head(hidden)
        return logits if logits.dtype == torch.float32 else logits.float()

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_table is not None and positions.dim() == 1:   # M-RoPE with 1-D positions: every axis alike
            return self.rope_table.lookup(positions)
        if self.mrope_section is None:
            if positions.dim() != 1:
                raise ValueError(f"positions: {list(positions.shape)} M-RoPE positions for a 1-D RoPE model")
            return self.ops.rope_cos_sin(positions, self.inv_freq, self.dtype)
        if isinstance(self.rope_table, MRopeTable):     # CPU, [3, T] positions: each column from the 1-D table
            return self.rope_table.lookup_mrope(positions)
        if positions.dim() == 1:        # text and decode on an M-RoPE model: all three axes are equal
            positions = positions.expand(3, -1)
        return self.ops.rope_cos_sin(positions, self.inv_freq, self.dtype, self.mrope_section)

    def _attention(self, layer: int, p: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: ForwardBatch, kv: KVStorage) -> torch.Tensor:
        cfg = self.cfg
        qkv = self.linears[f"{p}.attention.qkv"](x)
        key_cache, value_cache = kv.key_caches[layer], kv.value_caches[layer]
        if self.kv_algo is None:        # RoPE, the KV write and attention: one op (one compiled call on CPU)
            out = self.ops.qkv_attention(qkv, cos, sin, key_cache, value_cache, batch.slot_mapping,
                                         batch.attention, self.scale)
            return self.linears[f"{p}.attention.dense"](out)
        # one-byte cache with the layer's static scale (runtime/executor/kv_quant.py)
        q, k, v = qkv.split_with_sizes(self.qkv_sizes, dim=-1)
        q = q.view(-1, cfg.num_attention_heads, cfg.head_size)
        k = k.view(-1, cfg.num_key_value_heads, cfg.head_size)
        v = v.view(-1, cfg.num_key_value_heads, cfg.head_size)
        q, k = self.ops.apply_rope(q, k, cos, sin)
        kv_scale = self.w[f"{p}.attention.kv_cache_scaling_factor"]
        write_kv_cache_quant(self.ops, key_cache, value_cache, k, v, batch.slot_mapping, kv_scale, self.kv_algo)
        out = paged_attention_quant(self.ops, q, key_cache, value_cache, batch.attention, self.scale,
                                    self.kv_tables[layer])
        return self.linears[f"{p}.attention.dense"](out.reshape(-1, self.q_size))

    def _mlp(self, layer: int, p: str, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up:
            gate, up = self.gate_up[layer](x).split_with_sizes(self.gate_up_sizes, dim=-1)
        else:
            gate, up = self.linears[f"{p}.mlp.fc"](x), self.linears[f"{p}.mlp.gate"](x)
        return self.linears[f"{p}.mlp.proj"](self.ops.silu_and_mul(gate, up))

    def _fuse_gate_up(self) -> list[LinearFn]:
        """Float engines: each layer's gate (`mlp.fc`) and up (`mlp.gate`) projections as one GEMM over
        [gate; up] weights, their checkpoint tensors dropped; [] where a linear is quantized."""
        fused: list[LinearFn] = []
        for i in range(self.cfg.num_hidden_layers):
            pair = [self.linears[f"{layer_prefix(i)}.mlp.{name}"] for name in ("fc", "gate")]
            if not all(isinstance(linear, FloatLinear) for linear in pair):
                return []
            fused.append(concat_float_linears(pair))     # type: ignore[arg-type]  (checked above)
        dropped = tuple(f"{layer_prefix(i)}.mlp.{name}" for i in range(self.cfg.num_hidden_layers)
                        for name in ("fc", "gate"))
        for base in dropped:
            del self.linears[base]
        self.w = {n: t for n, t in self.w.items() if not n.startswith(tuple(f"{base}." for base in dropped))}
        return fused


class RopeTable:
    """1-D RoPE cos / sin per position, computed once by the reference formula (`rope_cos_sin`, so each
    row holds exactly the values it gives for that position) and indexed each step, instead of a product,
    a concatenation, a cos and a sin per step. Starts at `num_positions` rows and doubles when a step
    reaches past it. For CPU: on CUDA the per-step computation is a few asynchronous kernels, and a
    position past the table would be a device-side assert rather than the IndexError caught here."""

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype, num_positions: int = 4096) -> None:
        self.inv_freq, self.dtype = inv_freq, dtype
        self.cos, self.sin = self._compute(torch.arange(num_positions, device=inv_freq.device))

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos / sin [T, head_size] in the activation dtype."""
        try:
            return self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        except IndexError:                 # past the table, or negative: not in any table
            if int(positions.min()) < 0:
                return self._compute(positions)
            self._grow(int(positions.max()))
            return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def _grow(self, max_position: int) -> None:
        rows = self.cos.shape[0]
        while rows <= max_position:
            rows *= 2
        self.cos, self.sin = self._compute(torch.arange(rows, device=self.inv_freq.device))

    def _compute(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.inv_freq, self.dtype)


class MRopeTable(RopeTable):
    """M-RoPE cos / sin ([3, T] positions, Qwen2-VL) from the same 1-D table. The reference's value in
    column j of token t is cos / sin(position[axis(j), t] * inv_freq[j mod D/2]), axis(j) the (t, h, w)
    axis of j's `mrope_section` chunk: that is the 1-D table's entry at row position[axis(j), t], column j.
    So one index_select (each column's axis row of the positions) and one gather per table give exactly the
    reference's values (tests/runtime/executor/test_rope_tables.py), instead of its product, split,
    concatenations, cos and sin each step (issue 13: VL prefill steps). For CPU, as RopeTable."""

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype, mrope_section: tuple[int, int, int],
                 num_positions: int = 4096) -> None:
        super().__init__(inv_freq, dtype, num_positions)
        self.mrope_section = mrope_section
        if sum(mrope_section) != inv_freq.shape[0]:
            raise ValueError(f"mrope_section: {tuple(mrope_section)} must sum to {inv_freq.shape[0]} "
                             f"(head_size / 2)")
        axes = torch.cat([torch.full((n,), i % 3, dtype=torch.int64) for i, n in enumerate(mrope_section)])
        self.column_axes = torch.cat([axes, axes]).to(inv_freq.device)      # [head_size]: each column's axis

    def lookup_mrope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] -> cos / sin [T, head_size] in the activation dtype."""
        if positions.dim() != 2 or positions.shape[0] != 3:       # the reference's error
            return rope_cos_sin(positions, self.inv_freq, self.dtype, self.mrope_section)
        rows = positions.index_select(0, self.column_axes).t()   # [T, head_size]: the table row of each value
        try:
            return self.cos.gather(0, rows), self.sin.gather(0, rows)
        except RuntimeError:               # past the table, or negative (gather raises for both)
            if int(positions.min()) < 0:
                return rope_cos_sin(positions, self.inv_freq, self.dtype, self.mrope_section)
            self._grow(int(positions.max()))
            return self.cos.gather(0, rows), self.sin.gather(0, rows)
