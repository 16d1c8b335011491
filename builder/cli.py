"""`trtserve-build`: build an engine directory from a preset, HF directory or hub id."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.calib_data import QuantizeError
from builder.pipeline import BuildRequest, build_engine
from builder.quantize import QuantRequest
from builder.vision_quant import VISION_QUANT_MODES
from engine_format.quant_config import KV_CACHE_MODES, QUANT_MODES
from builder.presets import DTYPES, PresetError, list_presets
from builder.source import SourceError
from builder.convert import ConversionError
from builder.vision_export import VisionExportError
from engine_format.errors import EngineLoadError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trtserve-build", description=__doc__)
    parser.add_argument("--model", required=True,
                        help=f"preset ({', '.join(list_presets())}), HF checkpoint directory, "
                             "Llama / Qwen2 .gguf file, or hub id")
    parser.add_argument("--output", type=Path, help="engine directory (default engines/<model>[-<dtype>])")
    parser.add_argument("--dtype", choices=DTYPES, help="weights / activations dtype (default: the preset's)")
    parser.add_argument("--random-weights", action="store_true",
                        help="for hub presets: build the same shapes with seeded random weights, offline")
    parser.add_argument("--force", action="store_true", help="rebuild even if the inputs did not change")
    parser.add_argument("--no-validate", action="store_true", help="skip the parity check against HF")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "trtserve")
    for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    parser.add_argument("--quant", choices=tuple(QUANT_MODES),
                        help="quantize the LLM's linear layers (calibrated with NVIDIA Model Optimizer)")
    parser.add_argument("--kv-cache-dtype", choices=tuple(KV_CACHE_MODES), help="one-byte KV cache")
    parser.add_argument("--calib-data", type=Path, help='calibration JSONL, one {"text": ...} per line; VL '
                        'engines also take "image" / "images": paths relative to the file, or data:image/...;base64 '
                        "URLs (default: the bundled set; VL: plus generated images)")
    parser.add_argument("--calib-size", type=int, default=32, help="calibration samples to use (default 32)")
    parser.add_argument("--export-hf", action="store_true",
                        help="also write llm/hf/: a Model Optimizer unified HF checkpoint (hf_quant_config.json)")
    parser.add_argument("--vision-quant", choices=VISION_QUANT_MODES,
                        help="VL engines: also write vision/encoder.int8.onnx (int8 Q/DQ, calibrated on the images), "
                             "checked against the float tower; the onnxruntime vision backend serves it")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from builder.progress import Progress

    args = parse_args(argv)
    suffix = "".join(f"-{v}" for v in (args.dtype, args.quant, args.kv_cache_dtype and f"kv{args.kv_cache_dtype}",
                                       args.vision_quant and f"vision{args.vision_quant}") if v)
    model_path = Path(args.model.rstrip("/"))
    name = model_path.stem if model_path.suffix == ".gguf" else model_path.name
    output = args.output or Path("engines") / f"{name}{suffix}"
    overrides = {k: getattr(args, k) for k in ("max_batch_size", "max_input_len", "max_seq_len",
                                               "max_num_tokens", "tokens_per_block")}
    request = BuildRequest(model=args.model, output=output, dtype=args.dtype, random_weights=args.random_weights,
                           force=args.force, validate=not args.no_validate, cache_dir=args.cache_dir,
                           overrides=overrides,
                           quant=QuantRequest(args.quant, args.kv_cache_dtype, args.calib_data, args.calib_size,
                                              args.export_hf, args.vision_quant))
    try:
        result = build_engine(request, Progress(6, enabled=not args.quiet))
    except (PresetError, SourceError, ConversionError, VisionExportError, EngineLoadError, QuantizeError) as exc:
        print(f"trtserve-build: error: {exc}", file=sys.stderr)
        return 2
    status = "up to date" if result.skipped else "built"
    print(f"{result.output}: {status}")
    if result.validation is not None and not result.validation["passed"]:
        print("trtserve-build: warning: validation did not pass; see validation.json", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
