#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package registry (the lent device machines: Python 3.12,
# x86-64, with torch, triton, transformers, onnx, onnxruntime, grpcio, protobuf, accelerate, pytest on the
# image). Run here, where pip works, from the repository root; it fills .whl/ (ignored by git through
# .git/info/exclude) with the project's dependencies that image lacks, at the versions this checkout's
# .venv uses. benchmarks/gpu_suite.sh installs .whl/*.whl into a private folder before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
packages=()
for name in grpcio grpcio-health-checking grpcio-reflection protobuf tritonclient python-rapidjson polygraphy \
            fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn xgrammar gguf; do
    v=$(version "$name")
    [ -n "$v" ] || { echo "gpu_wheels: $name is not installed in $PIP's environment" >&2; exit 2; }
    packages+=("$name==$v")
done
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "${packages[@]}"
du -sh .whl
