#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the batch scripts and for tests/test_slurm.py.
#
#   infra/slurm/local_cluster.sh start DIR    install (if missing), configure and start; prints the
#                                             `export SLURM_CONF=...` line the client commands need
#   infra/slurm/local_cluster.sh stop DIR     stop the daemons started from DIR
#   infra/slurm/local_cluster.sh status DIR   sinfo of that cluster
#
# Everything lives in DIR (slurm.conf, munge key and socket, state, spool, logs), so it touches
# nothing system-wide except installing Debian's packages (slurmctld slurmd slurm-client munge) when
# they are missing, which needs root and apt-get. The daemons run as root: slurmd must, and this is
# a development/CI machine. CPU-only configuration (facts.md): proctrack/linuxproc, task/none,
# select/cons_tres, JobRequeue=1; the node has `nproc` CPUs and a small RealMemory.
#
# Environment: GOLF_SLURM_CTLD_PORT, GOLF_SLURMD_PORT (default: free ports), GOLF_SLURM_START_TIMEOUT
# (seconds to wait for the node to be idle, default 60), GOLF_SLURM_FIRST_JOB_ID (the cluster's first
# job id, default 1: two clusters on one machine need distinct ranges, since train.sbatch derives its
# rendezvous port from the job id).
# Exit status: 0 ready; 3 SLURM cannot be installed here (callers skip); 1 it did not start (logs shown).
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; esac
[ $# -eq 2 ] || usage 2
cmd=$1
umask 022  # what this script creates is never writable by others (check_owner would refuse it next time)
DIR=$(mkdir -p "$2" && cd "$2" && pwd -P)
CONF=$DIR/etc/slurm.conf
MUNGE=$DIR/munge

log() { echo "local_cluster: $*" >&2; }

# As root this script trusts what DIR holds: slurm.conf (run by root daemons), the munge key, pid files
# (it kills those pids). A folder another user owns or can write could hand it theirs: refuse it.
check_owner() {
  [ "$(id -u)" = 0 ] || return 0
  local path owner mode
  for path in "$DIR" "$DIR"/{etc,state,spool,log,run} "$CONF" "$DIR/etc/plugstack.conf" "$DIR"/run/*.pid \
              "$MUNGE" "$MUNGE/munge.key" "$MUNGE/munged.pid"; do
    [ -e "$path" ] || [ -L "$path" ] || continue
    if [ -L "$path" ]; then
      log "refusing $path: a symbolic link (use a folder of your own, e.g. mktemp -d)"
      exit 1
    fi
    owner=$(stat -c %u "$path")
    mode=$(stat -c %a "$path")
    if [ "$owner" != 0 ]; then
      log "refusing $path: owned by uid $owner, not root (use a folder only root can write, e.g. mktemp -d)"
      exit 1
    fi
    if (( 8#$mode & 8#022 )); then
      log "refusing $path: writable by group or others (mode $mode); chmod go-w it or use another folder"
      exit 1
    fi
  done
}
check_owner

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local need=()
  command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
  command -v munged >/dev/null 2>&1 || need+=(munge)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "SLURM is not installed and cannot be installed here (missing: ${need[*]}; needs root and apt-get)"
    exit 3
  fi
  log "installing ${need[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends ${need[@]+"${need[@]}"} >/dev/null; }; then
    log "apt-get could not install ${need[*]}"
    exit 3
  fi
}

show_logs() {
  for f in "$DIR"/log/*.log "$MUNGE"/munged.log; do
    [ -f "$f" ] && { echo "---- $f (last lines)" >&2; tail -n 20 "$f" >&2; }
  done
}

start() {
  install_packages
  if [ "$(id -u)" != 0 ]; then
    log "slurmd must run as root (it starts jobs as their users); run this as root"
    exit 3
  fi
  mkdir -p "$DIR"/{etc,state,spool,log,run} "$MUNGE"
  chmod 700 "$MUNGE"
  # munge: its own key, socket and daemon in DIR (no system munged needed); /run/munge must exist
  mkdir -p /run/munge
  if [ ! -f "$MUNGE/munge.key" ]; then
    # umask 077: the key is never readable by others, not even between its creation and the chmod
    rm -f "$MUNGE/munge.key.tmp"
    (umask 077 && dd if=/dev/urandom of="$MUNGE/munge.key.tmp" bs=1024 count=1 status=none \
      && chmod 400 "$MUNGE/munge.key.tmp" && mv "$MUNGE/munge.key.tmp" "$MUNGE/munge.key")
  fi
  if ! pid_alive "$MUNGE/munged.pid"; then
    munged --force --key-file="$MUNGE/munge.key" --socket="$MUNGE/munge.socket" \
      --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" \
      || { show_logs; exit 1; }
  fi

  local host ctld_port slurmd_port cpus
  host=$(hostname -s)
  # GNU nproc answers OMP_NUM_THREADS where it is set (pytest-xdist workers set it to 1): the node
  # would then be too small for a --cpus-per-task=2 job, which stays PENDING (PartitionConfig)
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
  ctld_port=${GOLF_SLURM_CTLD_PORT:-$(free_port)}
  slurmd_port=${GOLF_SLURMD_PORT:-$(free_port)}
  first_job_id=${GOLF_SLURM_FIRST_JOB_ID:-1}
  if ! [[ $first_job_id =~ ^[1-9][0-9]{0,8}$ ]]; then
    log "GOLF_SLURM_FIRST_JOB_ID=$first_job_id: expected a positive whole number below 10^9"
    exit 1
  fi
  if [ ! -f "$CONF" ]; then
    cat >"$CONF".tmp <<EOF
# one-node development cluster written by infra/slurm/local_cluster.sh
ClusterName=golf-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE/munge.socket,cred_expire=20
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
FirstJobId=$first_job_id
ReturnToService=2
MinJobAge=3600
SlurmdTimeout=60
KillWait=30
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
PlugStackConfig=$DIR/etc/plugstack.conf
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    : >"$DIR/etc/plugstack.conf"
    mv "$CONF".tmp "$CONF"
  fi
  export SLURM_CONF=$CONF
  pid_alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF" || { show_logs; exit 1; }
  pid_alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF" -N "$host" || { show_logs; exit 1; }

  local deadline=$((SECONDS + ${GOLF_SLURM_START_TIMEOUT:-60})) state=""
  while [ $SECONDS -lt $deadline ]; do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    case "$state" in
      idle|mix|alloc) log "node $host is $state (SLURM_CONF=$CONF)"; echo "export SLURM_CONF=$CONF"; return 0 ;;
      down*|drain*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  log "node $host did not become idle within ${GOLF_SLURM_START_TIMEOUT:-60}s (state: '${state:-no answer}')"
  show_logs
  exit 1
}

stop_pid() {  # stop the daemon whose pid file is $1, SIGKILL after 10 s
  local pid
  pid_alive "$1" || return 0
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  # jobs first, so no training process outlives the cluster
  if [ -f "$CONF" ] && pid_alive "$DIR/run/slurmctld.pid"; then
    SLURM_CONF=$CONF scancel --full --user="$(id -un)" >/dev/null 2>&1 || true
    for _ in $(seq 60); do
      [ -z "$(SLURM_CONF=$CONF squeue -h -t RUNNING,COMPLETING 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  stop_pid "$DIR/run/slurmd.pid"
  stop_pid "$DIR/run/slurmctld.pid"
  stop_pid "$MUNGE/munged.pid"
  log "stopped the cluster in $DIR"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo ;;
  *) usage 2 ;;
esac
