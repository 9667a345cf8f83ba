#!/usr/bin/env bash
# Every GPU fact in one call: bash scripts/gpu-check.sh OUT [--device DEV] [--quick] [--parts P1,P2]
# (scripts/gpu_check.py says what each part runs; OUT gets summary.md and results.tgz)
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
