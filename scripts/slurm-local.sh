#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the tests marked `slurm` and for trying `run --slurm` by hand.
#
#   scripts/slurm-local.sh start    # install Debian's slurmctld slurmd slurm-client munge if missing, start them
#   scripts/slurm-local.sh env      # the line to source so that sbatch/squeue talk to it: eval "$(... env)"
#   scripts/slurm-local.sh status   # sinfo of the running cluster
#   scripts/slurm-local.sh stop     # stop the daemons this script started (by their pid files)
#
# Everything lives under $SNNBENCH_SLURM_DIR (default /tmp/snnbench-slurm): slurm.conf, state, spool, logs, pid
# files. The node is this machine with its CPUs and memory (`slurmd -C`), in one partition `debug`; jobs run as
# root. Needs root (apt-get, munged). Debian 12's Slurm is 22.05.
set -euo pipefail

DIR=${SNNBENCH_SLURM_DIR:-/tmp/snnbench-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)

die() { echo "slurm-local: $*" >&2; exit 2; }

install_if_missing() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root (apt-get)"
    echo "slurm-local: installing slurmctld slurmd slurm-client munge" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq slurmctld slurmd slurm-client munge >"$DIR/apt.log" 2>&1; then
        apt-get update -qq >>"$DIR/apt.log" 2>&1
        apt-get install -y -qq slurmctld slurmd slurm-client munge >>"$DIR/apt.log" 2>&1 \
            || die "apt-get install failed; see $DIR/apt.log"
    fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    local node cpus mem
    node=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$((mem * 9 / 10))  # leave the OS some room, and never claim more than slurmd finds
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF" <<EOF
ClusterName=snnbench
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire + 1 s (Slurm's default 120 s): short here, for tests
AuthInfo=cred_expire=${SNNBENCH_SLURM_CRED_EXPIRE:-10}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${SNNBENCH_SLURMCTLD_PORT:-6817}
SlurmdPort=${SNNBENCH_SLURMD_PORT:-6818}
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$((mem / cpus))
EOF
}

start() {
    mkdir -p "$DIR"
    install_if_missing
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
        echo "slurm-local: already running ($CONF)" >&2
        return 0
    fi
    write_conf
    # munge: reuse a running one (its socket answers), else start ours
    if ! munge -n </dev/null >/dev/null 2>&1; then
        [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        munged --force --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log"
        for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
        munge -n </dev/null >/dev/null 2>&1 || die "munged did not start; see $DIR/munged.log"
    fi
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    for _ in $(seq 100); do
        if sinfo -h -o "%T" 2>/dev/null | grep -qE "^idle|^mix|^alloc"; then
            echo "slurm-local: running; eval \"\$($0 env)\" to use it" >&2
            return 0
        fi
        sleep 0.2
    done
    sinfo >&2 || true
    die "the node did not come up; see $DIR/slurmctld.log and $DIR/slurmd.log"
}

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        if alive "$DIR/$name.pid"; then
            pid=$(cat "$DIR/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    status) SLURM_CONF=$CONF sinfo ;;
    *) die "usage: $0 start|stop|env|status" ;;
esac
