#!/usr/bin/env bash
# Fetch NVIDIA's perf_analyzer into a folder without installing anything system-wide:
#   benchmarks/get_perf_analyzer.sh [DEST]     (default .cache/perf_analyzer)
# The binary ships in the tritonclient 2.41.0 manylinux wheel; it needs libb64.so.0d (Debian libb64-0d)
# and libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel), and no GPU. The wheels are downloaded (not
# installed: the venv keeps tritonclient 2.73), the .deb is unpacked; DEST/perf_analyzer is a wrapper
# that sets the library path. x86-64 Linux with apt (Debian / Ubuntu) only.
set -euo pipefail
DEST=${1:-.cache/perf_analyzer}
DEST=${DEST%/}
PY=${PY:-python3}
[ -x "$DEST/perf_analyzer" ] && exit 0
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux1_x86_64 --python-version 3.11 -d "$TMP/wheels" \
    tritonclient==2.41.0 nvidia-cuda-runtime-cu12==12.3.101
if ! (cd "$TMP" && apt-get download libb64-0d >/dev/null 2>&1); then
    # a fresh machine may have no package lists yet (needs root, as CI has)
    apt-get update -qq
    (cd "$TMP" && apt-get download libb64-0d >/dev/null 2>&1)
fi
mkdir -p "$TMP/out/bin" "$TMP/out/lib" "$TMP/deb"
"$PY" - "$TMP" <<'PY'
import sys, zipfile
from pathlib import Path
tmp = Path(sys.argv[1])
wanted = {"perf_analyzer": tmp / "out/bin/perf_analyzer", "libcudart.so.12": tmp / "out/lib/libcudart.so.12"}
for wheel in (tmp / "wheels").glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            target = wanted.get(name.rsplit("/", 1)[-1])
            if target is not None and ("/bin/" in name or name.endswith(".so.12")):
                target.write_bytes(archive.read(name))
missing = [n for n, p in wanted.items() if not p.is_file()]
if missing:
    sys.exit(f"get_perf_analyzer: {missing} not found in the downloaded wheels")
PY
dpkg-deb -x "$TMP"/libb64-0d_*.deb "$TMP/deb"
cp "$(find "$TMP/deb" -name 'libb64.so.0d*' | head -1)" "$TMP/out/lib/libb64.so.0d"
chmod +x "$TMP/out/bin/perf_analyzer"
cat > "$TMP/out/perf_analyzer" <<'SH'
#!/usr/bin/env bash
HERE=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH="$HERE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$HERE/bin/perf_analyzer" "$@"
SH
chmod +x "$TMP/out/perf_analyzer"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$TMP/out" "$DEST"
"$DEST/perf_analyzer" --version >/dev/null 2>&1 || "$DEST/perf_analyzer" 2>&1 | grep -q "Usage" \
    || { echo "get_perf_analyzer: $DEST/perf_analyzer does not run" >&2; exit 1; }
echo "perf_analyzer: $DEST/perf_analyzer"
