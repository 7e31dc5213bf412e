#!/usr/bin/env bash
# The GPU check in one go (docs/gpu.md): install this project over the machine's own torch from the wheel
# folder, then run scripts/gpu_check.py with the arguments given here; its exit code is this script's.
#   bash scripts/gpu_check.sh [--out DIR] [--size tiny|full] [--only NAME ...] [--timeout S]
# Environment: PYTHON (default python3: the interpreter that has torch), SSD_WHEELS (default .whl, made by
# scripts/gpu_wheels.sh where there is package access), SSD_SITE (default .gpu_site: the pip --target
# folder used when site-packages cannot be written).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac # a path: absolute (step 2 runs in /)
WHEELS=${SSD_WHEELS:-.whl}
SITE=${SSD_SITE:-.gpu_site}
PIP=("$PY" -m pip --disable-pip-version-check --no-input --quiet)
FROM_WHEELS=(install --no-index --no-deps --find-links "$WHEELS")
start=$SECONDS
on_path() { export PYTHONPATH="$PWD/$1${PYTHONPATH:+:$PYTHONPATH}"; }
if [ -d "$SITE" ]; then on_path "$SITE"; fi # a previous run installed there

# 1. each pin whose package is missing or older than the pin (setuptools: only pip install -e . needs it)
need=()
if [ -f "$WHEELS/requirements.txt" ]; then
  while read -r pin; do
    name=${pin%%==*} want=${pin##*==}
    if [ -z "$name" ] || [ "$name" = setuptools ]; then continue; fi
    have=$("$PY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$name")
    if [ -z "$have" ] || [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1)" != "$want" ]; then
      need+=("$pin")
    fi
  done <"$WHEELS/requirements.txt"
else
  echo "gpu_check.sh: no $WHEELS/requirements.txt, no dependencies installed (scripts/gpu_wheels.sh makes it)" >&2
fi
mode=none
if [ ${#need[@]} -gt 0 ]; then
  echo "gpu_check.sh: installing ${need[*]} from $WHEELS"
  if "${PIP[@]}" "${FROM_WHEELS[@]}" "${need[@]}"; then
    mode=site-packages
  else
    echo "gpu_check.sh: site-packages refused them; installing into $SITE (PYTHONPATH) instead"
    "${PIP[@]}" "${FROM_WHEELS[@]}" --upgrade --target "$SITE" "${need[@]}"
    on_path "$SITE"
    mode=target
  fi
fi

# 2. the project itself, never its dependencies (torch stays the machine's own); skipped when `import ssd`
# from elsewhere already finds this checkout
project=installed here=$PWD
if ! (cd / && "$PY" -c 'import pathlib, sys, ssd
sys.exit(pathlib.Path(ssd.__file__).resolve().parent != pathlib.Path(sys.argv[1]).resolve())' "$here/ssd") 2>/dev/null; then
  project=editable
  if ! "${PIP[@]}" "${FROM_WHEELS[@]}" -e .; then
    echo "gpu_check.sh: pip install -e . failed; using the checkout through PYTHONPATH"
    on_path ""
    project=PYTHONPATH
  fi
fi
# recorded in gpu_check.json ("install"); the environment command reports any import that still fails
export GPU_CHECK_INSTALL="dependencies=$mode installed=${need[*]:-none} project=$project seconds=$((SECONDS - start))"
exec "$PY" scripts/gpu_check.py "$@"
