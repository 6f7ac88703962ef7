#!/usr/bin/env bash
# Builds .gpu_bundle/: what scripts/gpu_check.sh needs on a CUDA machine that has Python 3.12 and torch
# but no package registry, no NeMo and no speech tools (how the GPU check was run; docs/performance.md).
#
#   scripts/gpu_bundle.sh TARGET_PACKAGES      # a file of the names the target already has (pip list), one per
#                                              # line or comma-separated
# Writes .gpu_bundle/whl (for each package of this venv that the target lacks, torch aside, its wheel for CPython 3.12
# on manylinux x86-64, built here when PyPI has only a source archive; EXTRA="name==version ..." adds more,
# default lightning==2.4.0, the newest that nemo_toolkit 3.0.0 accepts), .gpu_bundle/tools.tar.xz (flite,
# espeak-ng and sox from this machine with every library they load except glibc's, and espeak-ng's English
# data) and .gpu_bundle/run.sh, which on the target installs both under /tmp and runs scripts/gpu_check.sh
# (GC_LIMIT seconds at most, default 540), its logs and bench.json copied to $OUT.
# Add /.gpu_bundle/ to .git/info/exclude and carry .gpu_bundle/whl, .gpu_bundle/tools.tar.xz and
# .gpu_bundle/run.sh; the target runs `bash .gpu_bundle/run.sh` from the repository root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: scripts/gpu_bundle.sh TARGET_PACKAGES (a file of package names)" >&2; exit 2; }
PYTHON="${PYTHON:-.venv/bin/python}"
BUNDLE="$ROOT/.gpu_bundle"

# 1. Wheels: this venv's distributions that the target lacks (documentation tools and rlnf itself left out).
packages=$("$PYTHON" - "$1" <<'PY'
import re, sys
from importlib.metadata import distributions
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
target = {norm(n) for n in re.split(r"[,\s]+", open(sys.argv[1]).read()) if n}
if not target:
    sys.exit(f"gpu_bundle: {sys.argv[1]} names no packages")
skip = {"rlnf", "torch", "mkdocs", "mkdocs-get-deps", "ghp-import", "mergedeep", "pyyaml-env-tag", "watchdog", "wandb"}
print(" ".join(sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions()
                      if norm(d.metadata["Name"]) not in target | skip)))
PY
)
# Only now is the old bundle replaced (a refused list leaves it as it was).
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/whl" "$BUNDLE/tools/bin" "$BUNDLE/tools/lib" "$BUNDLE/tools/libexec"
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
for package in $packages ${EXTRA:-lightning==2.4.0}; do
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" --platform manylinux2014_x86_64 -d "$BUNDLE/whl" "$package" 2>/dev/null; then
    # Only a source archive: built here, which is right for pure Python alone (this venv is not 3.12).
    built="$(mktemp -d)"
    "$PYTHON" -m pip wheel -q --no-deps --no-binary=:all: -w "$built" "$package"
    for wheel in "$built"/*.whl; do
      case "$(basename "$wheel")" in *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$wheel" "$BUNDLE/whl/" ;;
        *) echo "gpu_bundle: $package has no wheel for CPython 3.12 and is not pure Python ($(basename "$wheel"))" >&2
           exit 1 ;; esac
    done
  fi
done

# 2. The speech tools with their libraries (not glibc's own, which the target has) and English espeak-ng data.
for tool in flite espeak-ng sox; do
  binary="$(command -v "$tool")" || { echo "gpu_bundle: $tool is not installed here" >&2; exit 1; }
  cp -L "$binary" "$BUNDLE/tools/libexec/"
  for library in $(ldd "$binary" | awk '/=>/ {print $3}'); do
    case "$(basename "$library")" in libc.so.*|libm.so.*|libpthread*|libdl.*|librt.*|ld-linux*) ;;
      *) [ -e "$BUNDLE/tools/lib/$(basename "$library")" ] || cp -L "$library" "$BUNDLE/tools/lib/" ;; esac
  done
done
data=/usr/lib/x86_64-linux-gnu/espeak-ng-data
mkdir -p "$BUNDLE/tools/share/espeak-ng-data"
cp -r "$data"/{phondata,phondata-manifest,phonindex,phontab,intonations,lang,voices,en_dict} "$BUNDLE/tools/share/espeak-ng-data/"
cat > "$BUNDLE/tools/bin/wrap.sh" <<'SH'
#!/usr/bin/env bash
# Runs the bundled tool this link is named after, with the bundle's libraries and espeak-ng data.
here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ESPEAK_DATA_PATH="$here/share"
exec "$here/libexec/$(basename "$0")" "$@"
SH
chmod +x "$BUNDLE/tools/bin/wrap.sh"
for tool in flite espeak-ng sox; do ln -sf wrap.sh "$BUNDLE/tools/bin/$tool"; done
tar -cJf "$BUNDLE/tools.tar.xz" -C "$BUNDLE" tools && rm -rf "$BUNDLE/tools"

# 3. What the target runs.
cat > "$BUNDLE/run.sh" <<'SH'
#!/usr/bin/env bash
# On the CUDA machine, from the repository root: install the bundle under /tmp, then run scripts/gpu_check.sh;
# the exit status is gpu_check.sh's.
set -uo pipefail
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_bundle/whl/*.whl && mkdir -p /tmp/b && tar -xJf .gpu_bundle/tools.tar.xz -C /tmp/b \
    && touch /tmp/site/.done || { echo "run.sh: installing the bundle failed" >&2; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/b/tools/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
(cd /tmp && flite -voice kal16 -t hi -o f.wav && espeak-ng -v en+m3 -w e.wav hi && sox -D e.wav -r 16000 e16.wav \
  && echo "speech tools: ok")
OUT="${OUT:-/tmp/gc-out}"; mkdir -p "$OUT"
PYTHON=python3 timeout "${GC_LIMIT:-540}" scripts/gpu_check.sh /tmp/gc 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
cp /tmp/gc/bench.json /tmp/gc/*.log "$OUT/" 2>/dev/null
exit "$status"
SH
chmod +x "$BUNDLE/run.sh"
echo "gpu_bundle: $(ls "$BUNDLE/whl" | wc -l) wheels; $(du -sh "$BUNDLE" | cut -f1) in $BUNDLE"
