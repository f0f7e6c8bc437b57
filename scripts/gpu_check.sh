#!/usr/bin/env bash
# Check a CUDA machine in one go (under 8 minutes on one H100/H200): the `gpu`-marked tests, then the
# throughput benchmark (benchmarks/bench_throughput.py: tokens/s and MFU of the plain, L0, hypernetwork
# and distillation steps at TinyLlama-1.1B's shape, bf16, FSDP2, SDPA and flash attention), gathered
# into one JSON file. Several GPUs: the benchmark runs on all of them under torch.distributed.run.
#
#   bash scripts/gpu_check.sh [--out gpu_check.json] [--cpu-smoke]
#
# --cpu-smoke runs the same steps on a machine without CUDA (the tests skip, the benchmark runs its tiny
# shape on the CPU), to check the script itself. Environment: PYTHON (default .venv/bin/python, else
# python3), TEST_TIMEOUT and BENCH_TIMEOUT in seconds (default 180 and 240). Exit status: 0 when every
# test and benchmark config passed or was skipped, 1 when one failed, 2 when the check cannot run here.
set -euo pipefail
cd "$(dirname "$0")/.."

out=gpu_check.json
smoke=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="${2:?--out needs a file name}"; shift 2 ;;
        --cpu-smoke) smoke=1; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (usage: bash scripts/gpu_check.sh [--out FILE] [--cpu-smoke])" >&2
           exit 2 ;;
    esac
done

py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
if ! "$py" -c "import drprune, composer" 2>/dev/null; then
    echo "gpu_check: $py cannot import drprune and composer: install them first (bash scripts/setup_venv.sh dev," \
         "or set PYTHON to an interpreter that has them)" >&2
    exit 2
fi
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" = 0 ] && [ "$smoke" = 0 ]; then
    echo "gpu_check: torch sees no CUDA device on this machine, so there is nothing to check: run it on a GPU" \
         "machine, or pass --cpu-smoke to exercise the script's code paths on the CPU" >&2
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# (a) the gpu-marked tests, only in the files that have them (collecting the whole suite costs minutes)
mapfile -t gpu_files < <(grep -l "pytest.mark.gpu" tests/test_*.py || true)
test_rc=5  # pytest's "no tests collected"
if [ ${#gpu_files[@]} -gt 0 ]; then
    echo "gpu_check: gpu-marked tests in ${gpu_files[*]}"
    test_rc=0
    timeout "${TEST_TIMEOUT:-180}" "$py" -m pytest -q -m gpu -p no:cacheprovider --timeout 150 \
        --junitxml "$work/tests.xml" "${gpu_files[@]}" || test_rc=$?
fi

# (b) the throughput benchmark
bench=(benchmarks/bench_throughput.py --out "$work/bench.json")
if [ "$smoke" = 1 ]; then
    bench+=(--tiny --device cpu)
elif [ "$gpus" -gt 1 ]; then
    bench=(-m torch.distributed.run --standalone --nproc_per_node "$gpus" "${bench[@]}")
fi
bench_rc=0
timeout "${BENCH_TIMEOUT:-240}" "$py" "${bench[@]}" || bench_rc=$?

# (c) one JSON: the commit, the test outcomes and the benchmark's report
"$py" - "$work" "$out" "$test_rc" "$bench_rc" "$smoke" <<'EOF'
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from drprune.atomic import write_json

work, out, test_rc, bench_rc, smoke = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"


def git(*args):
    run = subprocess.run(["git", *args], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else None


tests = []
if (work / "tests.xml").is_file():
    for case in ET.parse(work / "tests.xml").iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        detail = next((child.get("message") for child in case if child.tag == outcome), None)
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "detail": detail})
bench_file = work / "bench.json"
benchmark = json.loads(bench_file.read_text()) if bench_file.is_file() else None
counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
bench_errors = [] if benchmark is None else [r for r in benchmark["results"] if r["status"] == "error"]
result = {
    "check": "gpu_check", "cpu_smoke": smoke, "commit": git("rev-parse", "HEAD"),
    "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
    "tests": {"exit_status": test_rc, "timed_out": test_rc == 124, **counts, "cases": tests},
    "benchmark": {"exit_status": bench_rc, "timed_out": bench_rc == 124, "report": benchmark},
    "ok": test_rc in (0, 5) and bench_rc == 0 and benchmark is not None and not bench_errors,
}
write_json(out, result)
print(f"gpu_check: tests {counts}, benchmark {'ok' if bench_rc == 0 else f'exit {bench_rc}'}; wrote {out}")
sys.exit(0 if result["ok"] else 1)
EOF
