#!/usr/bin/env bash
# One device call of the paper-protocol study (issue 13): several parts in a row on one machine. The family is
# trained once into WORK and reused by every later part of the call (and by a next call while the machine is
# still warm); each part writes OUT/results-partN.json and OUT/log-partN.txt, and everything is also packed into
# OUT/paper.tgz (the device tool returns at most 8 files).
#
#   bash benchmarks/quality/paper_gpu.sh OUT "1 3" [SECONDS]     # SECONDS: this call's budget (default 540)
#
# Needs benchmarks/quality/data-paper (python benchmarks/quality/paperdata.py --out benchmarks/quality/data-paper,
# then carry it). Each part gets what is left of the budget less a 60 s margin as its --budget-s (no contender or
# seed starts after it); a part cut short is finished later with paper_run.py --previous ... --missing-only.
# PAPER_PRESET=micro runs the same chain at test size on a CPU; PAPER_WORK overrides the work folder, PYTHON the
# interpreter.
set -uo pipefail
out=${1:?usage: paper_gpu.sh OUT \"PARTS\" [SECONDS]}
parts=${2:?usage: paper_gpu.sh OUT \"PARTS\" [SECONDS]}
budget=${3:-540}
preset=${PAPER_PRESET:-gpu}
work=${PAPER_WORK:-${TMPDIR:-/tmp}/paper-$preset}
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if { [ "$preset" = gpu ] || [ "$preset" = cpu ]; } && [ ! -f benchmarks/quality/data-paper/manifest.json ]; then
  echo "paper_gpu.sh: benchmarks/quality/data-paper is missing: run paperdata.py and carry it" >&2; exit 1
fi
mkdir -p "$out"
start=$SECONDS
status=0
for p in $parts; do
  left=$(( budget - (SECONDS - start) - 60 ))
  if [ $left -le 30 ]; then echo "part $p: not started (budget spent)"; status=1; continue; fi
  echo "== part $p (budget $left s, $(( SECONDS - start )) s into the call)"
  "${PYTHON:-python3}" benchmarks/quality/paper_run.py --part "$p" --out "$out" --work "$work" --preset "$preset" \
    --budget-s "$left" --quiet > "$out/log-part$p.txt" 2>&1
  rc=$?
  tail -n 4 "$out/log-part$p.txt"
  [ $rc -eq 0 ] || status=1
done
(cd "$out" && tar czf paper.tgz results-part*.json log-part*.txt 2>/dev/null)
echo "== done in $(( SECONDS - start )) s (rc $status); packed into $out/paper.tgz"
exit $status
