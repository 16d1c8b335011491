#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package registry (the lent device machines: Python 3.12,
# x86-64). Run here, where pip works, from the repository root: it fills .whl/ (ignored by git through
# .git/info/exclude) with the project's core dependencies that such an image lacks (every one not in
# IMAGE_HAS below), their known extra requirements, and grpcio / protobuf at this checkout's versions,
# each at the version this checkout's .venv uses. benchmarks/gpu_suite.sh installs .whl/*.whl into a
# private folder before it starts, and its preflight names anything still missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
PY=${PY:-.venv/bin/python}
# On the GPU image (device notes, KINDS.md), with versions that satisfy pyproject.toml:
IMAGE_HAS=" torch transformers tokenizers safetensors numpy pillow pyyaml jinja2 tqdm ml-dtypes prometheus-client "
IMAGE_HAS+=" onnx onnxruntime accelerate numba "
# Requirements of the downloaded packages that the image lacks:
EXTRA="python-rapidjson starlette pydantic pydantic-core annotated-types typing-inspection"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
names=$("$PY" - <<'PYEOF'
import re, tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    print(re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0])
PYEOF
)
packages=()
for name in $names $EXTRA; do
    case "$IMAGE_HAS" in *" $name "*) continue ;; esac
    v=$("$PIP" show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    [ -n "$v" ] || { echo "gpu_wheels: $name is not installed in $PIP's environment" >&2; exit 2; }
    packages+=("$name==$v")
done
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "${packages[@]}"
echo "gpu_wheels: ${packages[*]}"
du -sh .whl
