#!/usr/bin/env bash
# A real Slurm cluster on this machine for the tests: slurmctld + two slurmd (nodes n1, n2).
#
#   tests/slurm/cluster.sh up     install Debian's slurm + munge if missing, start the daemons,
#                                 wait until both nodes are idle
#   tests/slurm/cluster.sh down   stop every daemon, remove state, restore /etc/hosts
#
# Needs root (apt, /etc/hosts, daemons run as root: SlurmUser=root). Everything lives under
# $FTL_SLURM_DIR (default /tmp/ftl-slurm); `down` leaves nothing running.
set -euo pipefail

DIR=${FTL_SLURM_DIR:-/tmp/ftl-slurm}
CONF=$DIR/slurm.conf
CPUS=${FTL_SLURM_CPUS:-4}
HOSTS_MARK="# ftl-test-slurm"

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then return; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR"/{state,spool/n1,spool/n2,log}
  cat >"$CONF" <<EOF
ClusterName=ftltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6917
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=6918 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=6919 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  install
  write_conf
  if ! grep -q "$HOSTS_MARK" /etc/hosts; then
    cp /etc/hosts "$DIR/hosts.orig"
    echo "127.0.0.1 n1 n2 $HOSTS_MARK" >>/etc/hosts
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
  chmod 0400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged"
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N n1
  slurmd -f "$CONF" -N n2
  for _ in $(seq 1 100); do
    if [ "$(sinfo -h -o '%t' -N 2>/dev/null | grep -c idle)" = 2 ]; then echo "slurm up: n1 n2 idle ($CONF)"; return; fi
    sleep 0.2
  done
  echo "slurm did not come up; see $DIR/log" >&2
  sinfo -N >&2 || true
  exit 1
}

running() {
  for name in slurmctld slurmd slurmstepd munged; do
    pgrep -x "$name" >/dev/null && return 0
  done
  return 1
}

down() {
  for pidfile in "$DIR"/slurmd-n1.pid "$DIR"/slurmd-n2.pid "$DIR"/slurmctld.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  pkill -f "slurmd -f $CONF" 2>/dev/null || true
  pkill -f "slurmctld -f $CONF" 2>/dev/null || true
  pkill -f slurmstepd 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  for _ in $(seq 1 200); do
    running || break
    sleep 0.1
  done
  for name in slurmctld slurmd slurmstepd; do pkill -9 -x "$name" 2>/dev/null || true; done
  if [ -f "$DIR/hosts.orig" ]; then cp "$DIR/hosts.orig" /etc/hosts; else sed -i "/$HOSTS_MARK/d" /etc/hosts; fi
  rm -rf "$DIR"
  echo "slurm down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
