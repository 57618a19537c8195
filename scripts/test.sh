#!/usr/bin/env bash
# Runs the whole test suite: installs libtorch if needed (scripts/setup-libtorch.sh), then
# checks formatting and lints and runs every unit and integration test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-libtorch.sh
# The cross-checks compare with OpenCV in the set-up venv (they fail without it).
"$(readlink -f .libtorch)/../../../../bin/python" -m pip install --quiet --disable-pip-version-check opencv-python-headless==5.0.0.93
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets -- --test-threads=2
