#!/usr/bin/env bash
# A real one-node Slurm cluster on the loopback address, for the Slurm executor's tests: Debian's
# slurmctld, slurmd and munge (installed with apt-get when missing), a generated slurm.conf, state
# and logs in DIR. Usage:
#   eval "$(scripts/slurm-cluster.sh start DIR)"   # starts it; prints the variables to export
#   scripts/slurm-cluster.sh stop DIR              # stops every daemon by its PID
# The exported variables: SLURM_CONF (clients read it) and TEST_SLURM_DIR.
set -euo pipefail
action=${1:?usage: slurm-cluster.sh start|stop DIR}
dir=${2:?usage: slurm-cluster.sh start|stop DIR}
dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
# shellcheck source=scripts/service.sh
source "$(dirname "$0")/service.sh"
stop() {
  for name in slurmd slurmctld munged; do
    stop_pid_file "$dir/$name.pid"
  done
}
case "$action" in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "usage: slurm-cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
  ! command -v munged >/dev/null; then
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge; } >&2
fi
host=$(hostname -s)
read -r ctld_port slurmd_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
# munged runs as the munge user, which must reach its directory (mktemp -d makes DIR private).
chmod 755 "$dir"
# munged, as the munge user, with its own socket (a system munged may be running or not).
[ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
chown munge:munge "$dir/munge"
socket=$dir/munge/munge.socket
setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground --force \
  --socket="$socket" --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
  --seed-file="$dir/munge/munged.seed" >"$dir/log/munged.out" 2>&1 &
echo $! >"$dir/munged.pid"
for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done
[ -S "$socket" ] || { cat "$dir/log/munged.out" "$dir/munge/munged.log" >&2 2>/dev/null; echo "error: munged did not start" >&2; exit 1; }
cat >"$dir/slurm.conf" <<CONF
ClusterName=pipe-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/state/slurmctld.pid
SlurmdPidFile=$dir/spool/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
/usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
echo $! >"$dir/slurmctld.pid"
/usr/sbin/slurmd -D -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 &
echo $! >"$dir/slurmd.pid"
for _ in $(seq 100); do
  state=$(sinfo -h -o %t 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.1
done
if [ "$state" != idle ]; then
  tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" "$dir/log/"*.out >&2 2>/dev/null || true
  stop
  echo "error: the Slurm node is not idle (state: ${state:-none})" >&2
  exit 1
fi
cat <<VARS
export SLURM_CONF=$SLURM_CONF
export TEST_SLURM_DIR=$dir
VARS
