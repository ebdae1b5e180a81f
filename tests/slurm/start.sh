#!/bin/bash
# Start a one-host Slurm (munged + slurmctld + slurmd) for the tests, with a private configuration under
# $STRATA_SLURM_DIR (default /tmp/strata-slurm). Prints `SLURM_CONF=<path>` on success. The process ids it
# starts are appended to $STRATA_SLURM_DIR/pids; stop.sh stops exactly those. Exit 0 on success; otherwise
# prints the reason on stderr and exits non-zero (the tests then skip with that reason).
set -u
DIR=${STRATA_SLURM_DIR:-/tmp/strata-slurm}
fail() { echo "slurm start: $*" >&2; exit 1; }
for b in munged slurmctld slurmd sbatch sinfo scontrol; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || fail "$b is not installed (run tests/slurm/setup.sh)"
done
[ "$(id -u)" = 0 ] || fail "needs root to run slurmd and munged (uid $(id -u))"
mkdir -p "$DIR"/{spool/ctld,spool/d,log,run} || fail "cannot create $DIR"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)

# munge: reuse a running munged, else start one with a key of our own.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null
    chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
    su -s /bin/sh munge -c /usr/sbin/munged || fail "munged did not start"
    for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    [ -s /run/munge/munged.pid ] && cat /run/munge/munged.pid >> "$DIR/pids"
    munge -n </dev/null | unmunge >/dev/null 2>&1 || fail "munge round trip failed"
fi

cat > "$CONF" <<CONF
ClusterName=stratatest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

if ! scontrol ping 2>/dev/null | grep -q UP; then
    /usr/sbin/slurmctld -f "$CONF" || fail "slurmctld did not start (see $DIR/log/slurmctld.log)"
    for _ in $(seq 50); do [ -s "$DIR/run/slurmctld.pid" ] && break; sleep 0.1; done
    cat "$DIR/run/slurmctld.pid" >> "$DIR/pids" 2>/dev/null
fi
if ! [ -s "$DIR/run/slurmd.pid" ] || ! kill -0 "$(cat "$DIR/run/slurmd.pid")" 2>/dev/null; then
    /usr/sbin/slurmd -f "$CONF" || fail "slurmd did not start (see $DIR/log/slurmd.log)"
    for _ in $(seq 50); do [ -s "$DIR/run/slurmd.pid" ] && break; sleep 0.1; done
    cat "$DIR/run/slurmd.pid" >> "$DIR/pids" 2>/dev/null
fi
# Wait for the node to be schedulable.
for _ in $(seq 100); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -1)
    case "$state" in idle*|mix*|alloc*) echo "SLURM_CONF=$CONF"; exit 0 ;; esac
    sleep 0.2
done
fail "node not idle after 20 s (state '${state:-none}'; see $DIR/log/)"
