#!/usr/bin/env bash
# The GPU check in one go (docs/gpu.md): install this project over the machine's own torch, then run
# scripts/gpu_check.py, which writes OUT/gpu_check.json step by step and prints a table at the end.
#   bash scripts/gpu_check.sh [--out DIR] [--pytest] [other options of scripts/gpu_check.py]
# Environment: PYTHON (default python3: the interpreter that has torch), SSD_WHEELS (default .whl,
# made by scripts/gpu_wheels.sh on a machine with package access), SSD_SITE (default .gpu_site: the
# pip --target folder used when site-packages cannot be written).
# Exit code: the driver's (0 when every step passed or was skipped, 1 when a step failed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${SSD_WHEELS:-.whl}
SITE=${SSD_SITE:-.gpu_site}
PIP=("$PY" -m pip --disable-pip-version-check --no-input --quiet)
start=$SECONDS

if [ -d "$SITE" ]; then # a previous run installed here
  export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# 1. the missing dependencies: a pin is installed when its package is absent or older than the pin
installed_version() {
  "$PY" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$1"
}
need=()
if [ -f "$WHEELS/requirements.txt" ]; then
  while read -r pin; do
    name=${pin%%==*}
    want=${pin##*==}
    if [ -z "$name" ] || [ "$name" = setuptools ]; then # setuptools: only pip install -e . builds with it
      continue
    fi
    have=$(installed_version "$name")
    if [ -z "$have" ] || [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1)" != "$want" ]; then
      need+=("$pin")
    fi
  done <"$WHEELS/requirements.txt"
elif ! "$PY" -c 'import albumentations, pycocotools' 2>/dev/null; then
  echo "gpu_check.sh: albumentations or pycocotools is missing and there is no $WHEELS/requirements.txt;" >&2
  echo "  run 'bash scripts/gpu_wheels.sh' on a machine with package access and bring $WHEELS/ along (docs/gpu.md)" >&2
fi
mode=none
if [ ${#need[@]} -gt 0 ]; then
  echo "gpu_check.sh: installing ${need[*]} from $WHEELS"
  if "${PIP[@]}" install --no-index --no-deps --find-links "$WHEELS" "${need[@]}"; then
    mode=site-packages
  else
    echo "gpu_check.sh: site-packages refused them; installing into $SITE (PYTHONPATH) instead"
    "${PIP[@]}" install --no-index --no-deps --find-links "$WHEELS" --upgrade --target "$SITE" "${need[@]}"
    export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
    mode=target
  fi
fi

# 2. the project itself, never its dependencies (torch stays the machine's own)
this_checkout() { # is `import ssd` (from elsewhere than here) this checkout's ssd/?
  (cd / && "$PY" -c 'import pathlib, sys, ssd
sys.exit(pathlib.Path(ssd.__file__).resolve().parent != pathlib.Path(sys.argv[1]).resolve())' "$1/ssd") 2>/dev/null
}
if this_checkout "$PWD"; then
  project=installed
elif "${PIP[@]}" install --no-index --no-deps --find-links "$WHEELS" -e .; then
  project=editable
else
  echo "gpu_check.sh: pip install -e . failed; using the checkout through PYTHONPATH"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  project=PYTHONPATH
fi
# what the driver records in its environment step
export GPU_CHECK_INSTALL="dependencies=$mode installed=${need[*]:-none} project=$project seconds=$((SECONDS - start))"
"$PY" -c 'import albumentations, pycocotools.coco, ssd' || echo "gpu_check.sh: imports fail (see above); the check records it" >&2

exec "$PY" scripts/gpu_check.py "$@"
