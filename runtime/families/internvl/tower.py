"""The InternVL vision tower (InternViT), its pixel shuffle and MLP projector, as plain functions.

What it is for: one forward pass from tiles (`pixel_values [num_tiles, C, S, S]`,
runtime/families/internvl/preprocess.py) to LLM image embeddings [num_tiles * tokens_per_tile, out_hidden_size], reading
exactly the tensors of an InternVL `vision/encoder.safetensors`
(engine_format/internvl_config.py). Every tile is the same size (the tower's
image_size), so attention runs per tile as one batched SDPA call with no mask,
and the same function is the PyTorch backend and the graph exported to ONNX
(the tile count is the only dynamic dimension).
Per tile, as transformers' `InternVLModel.get_image_features` with
vision_feature_layer -1 and the "default" strategy: patch embedding, CLS token,
absolute position embeddings; pre-norm blocks (LayerNorm, attention, layer
scale lambda_1; LayerNorm, GELU MLP, layer scale lambda_2); drop the CLS row;
pixel shuffle 0.5 (each 2x2 block of patches becomes one token of 4x width, in
(row, column) order); LayerNorm, Linear, GELU, Linear.
Not for: preprocessing, batching across requests or caching (runtime/vision/vision_encoder.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_format.families.internvl import PROJECTOR, PROJECTOR_NORM_EPS, TOWER, InternVLVisionConfig


def internvl_forward(cfg: InternVLVisionConfig, w: dict[str, torch.Tensor], pixel_values: torch.Tensor
                     ) -> torch.Tensor:
    """Image embeddings [num_tiles * tokens_per_tile, out_hidden_size] in input order, in the weights' dtype."""
    emb = TOWER + "embeddings."
    proj = w[emb + "patch_embeddings.projection.weight"]
    e = cfg.hidden_size
    x = F.conv2d(pixel_values.to(proj.dtype), proj, w[emb + "patch_embeddings.projection.bias"],
                 stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)                                        # [T, N, E], patches row-major
    cls = w[emb + "cls_token"].expand(x.shape[0], 1, e)
    x = torch.cat([cls, x], dim=1) + w[emb + "position_embeddings"]
    for i in range(cfg.num_hidden_layers):
        x = _layer(cfg, w, f"{TOWER}encoder.layer.{i}.", x)
    return _project(cfg, w, _pixel_shuffle(cfg, x[:, 1:]))


def _layer(cfg: InternVLVisionConfig, w: dict[str, torch.Tensor], p: str, x: torch.Tensor) -> torch.Tensor:
    h = _layer_norm(w, p + "layernorm_before", x, cfg.hidden_size, cfg.layer_norm_eps)
    x = x + w[p + "lambda_1"] * _attention(cfg, w, p + "attention.", h)
    h = _layer_norm(w, p + "layernorm_after", x, cfg.hidden_size, cfg.layer_norm_eps)
    h = F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
    return x + w[p + "lambda_2"] * F.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])


def _layer_norm(w: dict[str, torch.Tensor], name: str, x: torch.Tensor, width: int, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (width,), w[name + ".weight"], w[name + ".bias"], eps)


def _attention(cfg: InternVLVisionConfig, w: dict[str, torch.Tensor], p: str, x: torch.Tensor) -> torch.Tensor:
    n, e = cfg.patches_per_tile + 1, cfg.hidden_size            # static sizes: the tile count stays dynamic
    heads, d = cfg.num_attention_heads, cfg.head_dim
    q, k, v = (F.linear(x, w[f"{p}{name}.weight"], w.get(f"{p}{name}.bias")).reshape(-1, n, heads, d).transpose(1, 2)
               for name in ("q_proj", "k_proj", "v_proj"))
    out = F.scaled_dot_product_attention(q, k, v)                        # [T, H, N, D], no mask: one tile each
    return F.linear(out.transpose(1, 2).reshape(-1, n, e), w[p + "projection_layer.weight"],
                    w[p + "projection_layer.bias"])


def _pixel_shuffle(cfg: InternVLVisionConfig, x: torch.Tensor) -> torch.Tensor:
    """[T, S*S, E] -> [T * (S/2)^2, 4E]: token (r, c) = patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)."""
    side, m, e = cfg.patches_per_side, cfg.merge_size, cfg.hidden_size
    x = x.reshape(-1, side // m, m, side // m, m, e).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, m * m * e)


def _project(cfg: InternVLVisionConfig, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    x = _layer_norm(w, PROJECTOR + "layer_norm", x, cfg.hidden_size * cfg.merge_size ** 2, PROJECTOR_NORM_EPS)
    x = F.gelu(F.linear(x, w[PROJECTOR + "linear_1.weight"], w[PROJECTOR + "linear_1.bias"]))
    return F.linear(x, w[PROJECTOR + "linear_2.weight"], w[PROJECTOR + "linear_2.bias"])
