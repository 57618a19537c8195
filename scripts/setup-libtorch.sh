#!/usr/bin/env bash
# Installs libtorch (the PyPI wheel torch==2.11.0, CUDA build that also runs on CPU) into a venv
# outside the repo, and links it as `.libtorch` at the repo root, where .cargo/config.toml points
# LIBTORCH. Idempotent: does nothing when the right version is already installed.
#
# Environment:
#   SVF_CACHE_DIR   cache folder (default ~/.cache/svf); the venv lives in $SVF_CACHE_DIR/torch-2.11.0
#   SVF_LIBTORCH    use an existing libtorch folder instead (must contain lib/libtorch.so, version 2.11.0)
set -euo pipefail

TORCH_VERSION=2.11.0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
link="$repo/.libtorch"

if [ -n "${SVF_LIBTORCH:-}" ]; then
  if [ ! -f "$SVF_LIBTORCH/lib/libtorch.so" ]; then
    echo "SVF_LIBTORCH=$SVF_LIBTORCH has no lib/libtorch.so; point it at a libtorch $TORCH_VERSION folder" >&2
    exit 1
  fi
  ln -sfn "$SVF_LIBTORCH" "$link"
  echo "libtorch: $SVF_LIBTORCH (from SVF_LIBTORCH)"
  exit 0
fi

cache=${SVF_CACHE_DIR:-$HOME/.cache/svf}
venv="$cache/torch-$TORCH_VERSION"
py="$venv/bin/python"

installed_version() {
  [ -x "$py" ] || return 1
  "$py" - <<'PY' 2>/dev/null
import importlib.metadata as m
print(m.version("torch"))
PY
}

if [ "$(installed_version || true)" != "$TORCH_VERSION" ]; then
  echo "Installing torch==$TORCH_VERSION into $venv (first time only, about 4.5 GB)..."
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$py" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$py" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy safetensors
fi

torch_dir=$("$py" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" "$link"
echo "libtorch: $torch_dir (torch $TORCH_VERSION)"
