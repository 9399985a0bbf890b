#!/usr/bin/env bash
# On a CUDA machine with torch, triton and transformers installed: build the extension in place (nothing is
# fetched from the network), run the GPU tests and the benchmarks, write everything to OUTDIR.
# Usage: bash benchmarks/gpu_suite.sh OUTDIR [--quick]
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUTDIR [--quick]}
quick=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())' || exit 1
status=0
step() { local name=$1; shift; echo "== $name: $*"; local t=$SECONDS; "$@" >"$out/$name.log" 2>&1; local rc=$?;
         echo "   rc=$rc in $((SECONDS - t)) s"; tail -n 25 "$out/$name.log"; [ $rc -eq 0 ] || status=1; }
step build env SYMPHONY_BUILD_CUDA=1 python3 setup.py -q build_ext --inplace
step gpu-tests python3 -m pytest -q -m gpu tests
bench_args=(--out "$out")
[ "$quick" = --quick ] && bench_args+=(--quick)
for b in benchmarks/bench_moe.py benchmarks/bench_correlation.py; do
  [ -f "$b" ] && step "$(basename "$b" .py)" python3 "$b" "${bench_args[@]}"
done
exit $status
