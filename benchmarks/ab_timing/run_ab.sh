#!/usr/bin/env bash
# Interleaved A/B timing of two code versions (this VM's timings drift by 10-30 % over minutes, so "before" and
# "after" are run alternately, each in a fresh process, and compared run by run).
#
#   git worktree add /tmp/base <revision>                       # the "before" code
#   bash benchmarks/ab_timing/run_ab.sh /tmp/base 3 benchmarks/ab_timing/time_io.py /tmp/io_ct.pt
#
# Arguments: the other checkout, the number of rounds, then the Python script and its arguments.  Each script
# prints one line per measurement starting with the checkout it imported (base / this).  NT=2 sets 2 threads.
set -euo pipefail
other="$1"; rounds="$2"; shift 2
python="${PYTHON:-python}"
for _ in $(seq "$rounds"); do
  PYTHONPATH="$other/DeepAbdominalReg" AB_LABEL=base "$python" "$@"
  AB_LABEL=this "$python" "$@"
done
