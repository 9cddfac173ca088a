#!/usr/bin/env bash
# One-shot GPU readiness check (see benchmarks/gpu_check.py): runs it with the repository's venv python, passing
# every argument through, e.g.  benchmarks/gpu_check.sh --device cuda --out /tmp/gpu_check
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
if [ ! -x "$python" ]; then
    python="$(command -v python3)"
    echo "note: $root/.venv/bin/python not found, using $python" >&2
fi
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
