#!/usr/bin/env bash
# A real one-host SLURM cluster (munge + slurmctld + slurmd, CPUs only) for testing the SLURM launchers:
#   bash scripts/slurm_localhost.sh start DIR   # writes DIR/slurm.conf, starts the daemons; prints `export SLURM_CONF=...`
#   bash scripts/slurm_localhost.sh stop DIR
# Needs Debian's packages (as root): apt-get install -y slurm-wlm munge. The partition `debug` holds this host
# with all its CPUs; jobs may requeue themselves (JobRequeue=1). Nothing outside DIR is written except munge's
# own run directory.
set -euo pipefail
CMD="${1:?usage: $0 start|stop DIR}"; DIR="$(mkdir -p "${2:?usage: $0 start|stop DIR}" && cd "$2" && pwd)"
export SLURM_CONF="$DIR/slurm.conf"

stop() {
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    [[ -f "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
}

if [[ "$CMD" == stop ]]; then stop; exit 0; fi
[[ "$CMD" == start ]] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
for bin in munged slurmctld slurmd sbatch; do
  command -v "$bin" >/dev/null || { echo "error: $bin not found: apt-get install -y slurm-wlm munge" >&2; exit 5; }
done

HOST="$(hostname -s)"
NODE="$(slurmd -C | head -n 1)"   # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
cat > "$SLURM_CONF" <<EOF
ClusterName=cslm-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=$(( 6817 + RANDOM % 1000 ))
SlurmdPort=$(( 7817 + RANDOM % 1000 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=5
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MpiDefault=none
${NODE%%UpTime*} State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
# munge: start it unless one is running already
if ! munge -n </dev/null >/dev/null 2>&1; then
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  if id munge >/dev/null 2>&1; then su -s /bin/sh munge -c munged; else munged --force; fi
fi
stop
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "error: SLURM did not come up; see $DIR/log/" >&2
exit 1
