#!/usr/bin/env bash
# Runs the whole test suite: installs libtorch if needed (scripts/setup-libtorch.sh) and the
# cross-check tools, then checks formatting and lints and runs every unit and integration test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-libtorch.sh
# The reference tools the cross-checks compare with, into the venv behind .libtorch (without them
# those tests fail): OpenCV for the transforms, scipy to write SBD-style MAT-files, pycocotools to
# rasterise COCO masks.
venv=$(cd "$(readlink -f .libtorch)/../../../.." && pwd)
if [ -x "$venv/bin/python" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    opencv-python-headless==5.0.0.93 scipy==1.17.1 pycocotools==2.0.11
fi
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets -- --test-threads=2
