#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on a GPU machine that has no internet and lacks
# albumentations and pycocotools (Python 3.12, x86-64 Linux, torch preinstalled): docs/gpu.md.
# Run on a machine with package access; the folder travels with the checkout (~7 MB).
#   bash scripts/gpu_wheels.sh [DIR]        (default .whl/, ignored by git)
# Only these wheels: torch, torchvision, numpy, scipy, opencv, PyYAML and the rest are preinstalled there.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}

# The one list of pins. Floors: pyproject.toml and the Requires-Dist of each wheel.
PINS=(
  albumentations==2.0.8      # pyproject: >=2.0.2,<3
  albucore==0.0.24           # albumentations 2.0.8 pins it
  stringzilla==5.3.2         # albucore: >=3.10.4 (binary)
  simsimd==6.5.16            # albucore: >=5.9.2 (binary)
  pydantic==2.14.4           # albumentations: >=2.9.2
  pydantic-core==2.50.5      # pydantic 2.14.4 pins it (binary)
  annotated-types==0.8.0     # pydantic: >=0.6.0
  typing-inspection==0.4.5   # pydantic: >=0.4.4
  typing-extensions==4.16.0  # pydantic: >=4.16.0; gpu_check.sh installs it only over an older one
  pycocotools==2.0.11        # pyproject: >=2.0.8 (binary)
  setuptools==84.2.1         # pyproject's build backend (>=77), for pip install -e . without an index
)
# The GPU machines' interpreter and platform (manylinux tags pip accepts there, newest first).
PLATFORM=(--python-version 3.12 --implementation cp)
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORM+=(--platform "$tag")
done

mkdir -p "$DIR"
for pin in "${PINS[@]}"; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DIR" "$pin"
done
# requirements.txt is what gpu_check.sh installs: the folder may hold wheels of earlier pins too
printf '%s\n' "${PINS[@]}" >"$DIR/requirements.txt"

# every pin has the wheel its name and version say (wheel names write - as _)
shopt -s nocaseglob
missing=0
for pin in "${PINS[@]}"; do
  stem="${pin%%==*}"
  if ! compgen -G "$DIR/${stem//-/_}-${pin##*==}-*.whl" >/dev/null; then
    echo "gpu_wheels.sh: no wheel for $pin in $DIR" >&2
    missing=1
  fi
done
[ "$missing" = 0 ] || exit 1
wheels=("$DIR"/*.whl)
ls -l "$DIR"
echo "$(du -sh "$DIR" | cut -f1) in $DIR (${#wheels[@]} wheels); install there with: bash scripts/gpu_check.sh"
