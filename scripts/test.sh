#!/usr/bin/env bash
# `make test`: the suite as two pytest runs side by side, each report printed whole.
# The Slurm tests spend most of their minutes waiting on slurmctld (its time checks every 30 s,
# job starts, requeues), so they run beside the rest of the suite rather than after it: the
# wall-clock time of CI falls by about those waits. Their ranks use ports of their own (2973x-2977x;
# the other tests ask the kernel for free ones) and a base temp directory of their own.
#   scripts/test.sh PYTHON [PYTEST ARGS...]
set -uo pipefail
PY=$1
shift
log=$(mktemp)
slurm_tmp=$(mktemp -d)
"$PY" -P -m pytest -q --durations=10 -p no:cacheprovider --basetemp "$slurm_tmp/t" -m slurm "$@" >"$log" 2>&1 &
slurm=$!
"$PY" -P -m pytest -q --durations=25 -m "not slurm" "$@"
rest=$?
wait "$slurm"
slurm_rc=$?
echo "---------------- the Slurm tests (run beside the others) ----------------"
cat "$log"
rm -rf "$log" "$slurm_tmp"
[ "$slurm_rc" -eq 5 ] && slurm_rc=0  # the arguments selected no Slurm test
[ "$rest" -eq 5 ] && rest=0
exit $(( rest != 0 ? rest : slurm_rc ))
