"""The LLaVA-1.5 / LLaVA-NeXT vision side as plain functions: CLIP tower, MLP projector, row gathering.

What it is for: `encode_rows`, one forward pass from crops (`pixel_values
[N, C, S, S]`, as runtime/families/llava/preprocess.py makes them) to the LLM's
embedding rows: CLIP embeddings with the class token, pre-LayerNorm, the first
`num_layers` encoder layers (the hidden state `vision_feature_layer` selects),
the class token dropped under the 'default' strategy, Linear-GELU-Linear, then
one gather of the rows in the LLM's order. The gather indices come from the host
(runtime/families/llava/geometry.py), so LLaVA-NeXT's unpadding and its
`image_newline` rows are data, not control flow: the same function is the
PyTorch backend and the static graph exported to ONNX. Equal to transformers'
`LlavaModel` / `LlavaNextModel.get_image_features` (tests/runtime/vision/test_llava_tower.py).
Not for: preprocessing, the anyres geometry, caching or batching across requests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_format.families.llava import LlavaVisionConfig


def encode_rows(cfg: LlavaVisionConfig, w: dict[str, torch.Tensor], pixel_values: torch.Tensor,
                gather_index: torch.Tensor) -> torch.Tensor:
    """Crops [N, C, S, S] -> rows [len(gather_index), out_hidden_size] in the weights' dtype.

    gather_index indexes the crops' feature rows flattened crop by crop ([N * tokens_per_crop]); on
    LLaVA-NeXT index N * tokens_per_crop is the image_newline row."""
    features = tower_features(cfg, w, pixel_values)
    flat = features.reshape(-1, cfg.out_hidden_size)
    if cfg.is_next:
        flat = torch.cat([flat, w["image_newline"].to(flat.dtype)[None]])
    return flat.index_select(0, gather_index)


def tower_features(cfg: LlavaVisionConfig, w: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
    """Crops [N, C, S, S] -> projected features [N, tokens_per_crop, out_hidden_size]."""
    dtype = w["embeddings.patch_embedding.weight"].dtype
    x = F.conv2d(pixel_values.to(dtype), w["embeddings.patch_embedding.weight"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)                                             # [N, P, E]
    cls = w["embeddings.class_embedding"].reshape(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + w["embeddings.position_embedding.weight"][None]
    x = _layer_norm(cfg, w, "pre_layrnorm", x)
    for i in range(cfg.num_layers):
        x = _layer(cfg, w, f"encoder.layers.{i}.", x)
    if cfg.select_strategy == "default":
        x = x[:, 1:]
    h = F.linear(x, w["projector.linear_1.weight"], w.get("projector.linear_1.bias"))
    return F.linear(F.gelu(h), w["projector.linear_2.weight"], w.get("projector.linear_2.bias"))


def _layer_norm(cfg: LlavaVisionConfig, w: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (cfg.hidden_size,), w[name + ".weight"], w[name + ".bias"], cfg.layer_norm_eps)


def _layer(cfg: LlavaVisionConfig, w: dict[str, torch.Tensor], p: str, x: torch.Tensor) -> torch.Tensor:
    x = x + _attention(cfg, w, p + "self_attn.", _layer_norm(cfg, w, p + "layer_norm1", x))
    h = F.linear(_layer_norm(cfg, w, p + "layer_norm2", x), w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])
    h = h * torch.sigmoid(1.702 * h) if cfg.hidden_act == "quick_gelu" else F.gelu(h)
    return x + F.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])


def _attention(cfg: LlavaVisionConfig, w: dict[str, torch.Tensor], p: str, x: torch.Tensor) -> torch.Tensor:
    """Full attention within each crop (the crop is the batch axis: no mask, any number of crops)."""
    n, length, _ = x.shape
    q, k, v = (F.linear(x, w[f"{p}{name}.weight"], w[f"{p}{name}.bias"])
               .reshape(n, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
               for name in ("q_proj", "k_proj", "v_proj"))
    out = F.scaled_dot_product_attention(q, k, v, scale=cfg.head_dim ** -0.5)
    return F.linear(out.transpose(1, 2).reshape(n, length, -1), w[p + "out_proj.weight"], w[p + "out_proj.bias"])
