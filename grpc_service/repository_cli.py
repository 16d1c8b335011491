"""`trtserve-repo`: write a Triton-style model repository for an engine directory.

  trtserve-repo --engine engines/tiny-qwen2 --output model_repo
  trtserve-serve --model-repository model_repo

Writes OUT/<model>/config.pbtxt and the version folder OUT/<model>/1/ for the
TensorRT-LLM backend's four models (ensemble, tensorrt_llm, preprocessing,
postprocessing), with the backend's tensor names and dtypes and the engine's
max_batch_size (a vision-language engine's ensemble also declares the image
inputs). Each config records the engine directory (parameter
`engine_dir`, relative to the model folder) and its role (`trtserve_role`).
`--decoupled false` makes ensemble and tensorrt_llm non-decoupled: unary
ModelInfer then works and streaming is refused, as in Triton.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_service.errors import InvalidArgument
from grpc_service.registry import check_model_name
from grpc_service.repository import write_repository
from grpc_service.triton_schema import RepositoryNames
from engine_format.engine_dir import parse_build, read_manifest
from engine_format.errors import EngineLoadError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trtserve-repo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, type=Path, help="engine directory built by trtserve-build")
    p.add_argument("--output", required=True, type=Path, help="model repository folder (created if missing)")
    p.add_argument("--decoupled", choices=("true", "false"), default="true",
                   help="ensemble / tensorrt_llm decoupled (streaming) mode (default true)")
    p.add_argument("--prefix", help="name the models <prefix>_ensemble, ... (several engines in one repository)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = read_manifest(args.engine)
        build = parse_build(manifest["build"])
        vision = isinstance(manifest.get("components"), dict) and "vision" in manifest["components"]
        names = RepositoryNames.prefixed(check_model_name(args.prefix, "prefix")) if args.prefix else RepositoryNames()
        written = write_repository(args.output, args.engine, names, build.max_batch_size, args.decoupled == "true",
                                   vision)
    except (EngineLoadError, InvalidArgument, OSError) as exc:
        print(f"trtserve-repo: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
