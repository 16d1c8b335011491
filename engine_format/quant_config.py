"""The quantization block of `llm/config.json` and the names of the build modes.

What it is for: one statement of which TensorRT-LLM quantization algorithms an
engine may carry, how the `trtserve-build --quant` / `--kv-cache-dtype` names
map onto them, and the checked parse of the `quantization` object. Its keys
are exactly the fields of TensorRT-LLM's `QuantConfig` dataclass
(tensorrt_llm/models/modeling_utils.py, built with `cls(**config)`, so an
unknown key is rejected there too).
Not for: the tensors each algorithm stores (engine_format/checkpoint_layout.py),
calibration (builder/quantize*.py) or the kernels (runtime/executor/quant_linear.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine_format.errors import EngineLoadError

# --quant name -> TensorRT-LLM QuantAlgo value (tensorrt_llm/quantization/mode.py)
QUANT_MODES: dict[str, str] = {
    "int8_wo": "W8A16", "int4_awq": "W4A16_AWQ", "w8a8_sq": "W8A8_SQ_PER_CHANNEL", "fp8": "FP8",
}
KV_CACHE_MODES: dict[str, str] = {"int8": "INT8", "fp8": "FP8"}
QUANT_ALGOS = tuple(QUANT_MODES.values())
KV_CACHE_QUANT_ALGOS = tuple(KV_CACHE_MODES.values())
# The fields of TensorRT-LLM's QuantConfig (tensorrt_llm/models/modeling_utils.py).
QUANT_CONFIG_KEYS = ("quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val",
                     "use_meta_recipe", "has_zero_point", "pre_quant_scale", "exclude_modules")
AWQ_GROUP_SIZE = 128
SMOOTHQUANT_ALPHA = 0.5
# Linear layers that stay in the model dtype in every mode (Model Optimizer's default configs disable
# the lm_head quantizer; the embedding is a lookup, not a GEMM).
EXCLUDED_MODULES = ("lm_head",)


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """The parsed `quantization` object; `quant_algo` None is an unquantized engine."""

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int = AWQ_GROUP_SIZE
    smoothquant_val: float = SMOOTHQUANT_ALPHA
    exclude_modules: tuple[str, ...] = field(default=())

    @property
    def pre_quant_scale(self) -> bool:
        return self.quant_algo in ("W4A16_AWQ", "W8A8_SQ_PER_CHANNEL")

    @classmethod
    def for_modes(cls, quant: str | None, kv_cache_dtype: str | None) -> "QuantSpec":
        """From the build flags (already checked against QUANT_MODES / KV_CACHE_MODES)."""
        algo = QUANT_MODES[quant] if quant else None
        kv = KV_CACHE_MODES[kv_cache_dtype] if kv_cache_dtype else None
        return cls(algo, kv, exclude_modules=EXCLUDED_MODULES if algo else ())

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.quant_algo is None:
            return data
        data.update(group_size=self.group_size, has_zero_point=False, pre_quant_scale=self.pre_quant_scale,
                    exclude_modules=list(self.exclude_modules))
        if self.quant_algo == "W8A8_SQ_PER_CHANNEL":
            data["smoothquant_val"] = self.smoothquant_val
        return data

    @classmethod
    def from_json(cls, data: Any, file: str) -> "QuantSpec":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise EngineLoadError(file, "expected an object", "quantization")
        unknown = sorted(set(data) - set(QUANT_CONFIG_KEYS))
        if unknown:
            raise EngineLoadError(file, f"unknown key (TensorRT-LLM's QuantConfig has {', '.join(QUANT_CONFIG_KEYS)})",
                                  f"quantization.{unknown[0]}")
        algo, kv = data.get("quant_algo"), data.get("kv_cache_quant_algo")
        if algo is not None and algo not in QUANT_ALGOS:
            raise EngineLoadError(file, f"{algo!r} is not served (null, {', '.join(QUANT_ALGOS)})",
                                  "quantization.quant_algo")
        if kv is not None and kv not in KV_CACHE_QUANT_ALGOS:
            raise EngineLoadError(file, f"{kv!r} is not served (null, {', '.join(KV_CACHE_QUANT_ALGOS)})",
                                  "quantization.kv_cache_quant_algo")
        group = data.get("group_size", AWQ_GROUP_SIZE)
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise EngineLoadError(file, f"expected a positive integer, got {group!r}", "quantization.group_size")
        if data.get("has_zero_point"):
            raise EngineLoadError(file, "zero points are not supported (symmetric quantization only)",
                                  "quantization.has_zero_point")
        exclude = data.get("exclude_modules") or []
        if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
            raise EngineLoadError(file, "expected a list of module names", "quantization.exclude_modules")
        if algo is not None and set(exclude) != set(EXCLUDED_MODULES):
            raise EngineLoadError(file, f"this runtime serves exactly {list(EXCLUDED_MODULES)} unquantized, "
                                  f"got {exclude}", "quantization.exclude_modules")
        return cls(algo, kv, group, float(data.get("smoothquant_val", SMOOTHQUANT_ALPHA)), tuple(exclude))
