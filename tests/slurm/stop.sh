#!/bin/sh
# Stop the daemons that start.sh started (by the process ids it recorded), nothing else.
DIR=${STRATA_SLURM_DIR:-/tmp/strata-slurm}
[ -f "$DIR/pids" ] || exit 0
for pid in $(cat "$DIR/pids"); do kill "$pid" 2>/dev/null; done
sleep 0.5
for pid in $(cat "$DIR/pids"); do kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null; done
rm -f "$DIR/pids"
exit 0
