#!/bin/bash
# Instructions per request of benchmarks/hotpath.py, counted by valgrind (steady on a loaded machine, unlike
# seconds): two runs of 10 and 60 rounds, the difference divided by the extra requests. Extra arguments go to
# hotpath.py (e.g. --target ceiling, --connections 1000). Needs valgrind (Debian package valgrind).
#   bash benchmarks/icount.sh [hotpath.py args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
conns=100
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[$i]}" = "--connections" ] && conns=${args[$((i + 1))]}; done
count() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$PY" benchmarks/hotpath.py --repeat 1 --rounds "$1" \
    "${args[@]}" 2>&1 | sed -n 's/.*Collected : //p'
}
a=$(count 10)
b=$(count 60)
python3 -c "print(f'{($b - $a) / (50 * 2 * $conns):.0f} instructions per request (checkout or checkin)')"
