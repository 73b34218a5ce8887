#!/bin/bash
# A real one-node SLURM cluster on this machine, for testing requeue/preemption: munge + slurmctld + slurmd.
#
#   scripts/local_slurm.sh up       install (Debian: slurmctld slurmd slurm-client munge) if missing, write
#                                   /etc/slurm/slurm.conf, start the daemons; idempotent (~2 s when all is up)
#   scripts/local_slurm.sh status   daemons and `sinfo`
#   scripts/local_slurm.sh down     cancel this cluster's jobs, stop exactly the daemons `up` started (PID files)
#
# CPU-only node (no GRES: submit with --gpus-per-node 0). Settings follow /work/shared/reference/local-slurm.md;
# with them a requeued job starts again ~6 s after `scontrol requeue` (SLURM's default: ~2 minutes).
# Needs root. Only this machine's own hostname is used; nothing is reached over the network.
set -euo pipefail

STATE=/run/scaletrain-slurm            # PID files + a note of which daemons we started
CONF=/etc/slurm/slurm.conf
MARK="# managed by scaletrain scripts/local_slurm.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "local_slurm: $*"; }
# alive PIDFILE: the process exists and is not a zombie (daemons are reparented to PID 1, which may be
# slow to reap them, and kill -0 succeeds on a zombie).
alive() { local s; [[ -s $1 ]] && s=$(ps -o stat= -p "$(cat "$1")") && [[ $s != Z* ]]; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # `apt-get update` does not wait for the lists lock (another apt may run): retry. install waits by itself.
  for _ in $(seq 60); do apt-get update -qq && break; sleep 5; done
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
}

start_munge() {
  mkdir -p /etc/munge /run/munge "$STATE"
  # Debian ships a key; make one only when missing.
  [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
  # A munged that answers is reused (and left running by `down` unless we started it): a second one
  # cannot start anyway ("Failed to lock munge.socket.2.lock").
  if munge -n >/dev/null 2>&1; then return 0; fi
  su -s /bin/sh munge -c /usr/sbin/munged
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  cp /run/munge/munged.pid "$STATE/munged.pid"   # copy: munged removes its own file on exit
  log "started munged (pid $(cat "$STATE/munged.pid"))"
}

write_conf() {   # prints "changed" when the file content changed
  local host cpus mem new
  host=$(hostname -s); cpus=$(nproc)
  # RealMemory above what slurmd detects makes the node "inval"; keep 5% headroom.
  mem=$(( $(slurmd -C | grep -o 'RealMemory=[0-9]*' | cut -d= -f2) * 95 / 100 ))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  new=$(cat <<CONF
$MARK (rewritten by every \`up\`; a file without this line was moved to slurm.conf.scaletrain-orig)
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
ReturnToService=2
MailProg=/bin/true
# Fast requeue for tests: a requeued job is held cred_expire+1 s (default 120; 5 is the minimum), and pending
# jobs are otherwise scheduled only every 60 s (main) / 30 s (backfill). Needs a daemon restart, not reconfigure.
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    if [[ -f $CONF.scaletrain-orig ]]; then  # an earlier original is kept: this one goes beside it, dated
      mv "$CONF.scaletrain-orig" "$CONF.scaletrain-orig.$(date +%Y%m%d%H%M%S)"
    fi
    mv "$CONF" "$CONF.scaletrain-orig"
    log "moved the existing $CONF to $CONF.scaletrain-orig (restored by down)" >&2
  fi
  if [[ ! -f $CONF || $(cat "$CONF") != "$new" ]]; then
    echo "$new" > "$CONF"
    echo changed
  fi
}

stop_pidfile() {   # stop_pidfile NAME: TERM, wait up to 10 s, then KILL; only the PID in our file
  local f=$STATE/$1.pid pid
  alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do alive "$f" || break; sleep 0.1; done
  if alive "$f"; then kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$f"
  log "stopped $1 (pid $pid)"
}

node_state() { sinfo -h -n "$(hostname -s)" -o %t 2>/dev/null || true; }

up() {
  [[ $(id -u) == 0 ]] || { echo "local_slurm: needs root" >&2; exit 1; }
  install_packages
  start_munge
  local changed
  changed=$(write_conf)
  if [[ -n $changed ]] && { alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.pid"; }; then
    log "slurm.conf changed: restarting the daemons"
    stop_pidfile slurmd; stop_pidfile slurmctld
  fi
  # Start what is not running from our PID files. A controller we did not start would be killed by a
  # second `slurmctld` ("killing old slurmctld"): refuse instead.
  if ! alive "$STATE/slurmctld.pid" && scontrol ping 2>/dev/null | grep -q UP; then
    echo "local_slurm: a slurmctld not started by this script is running; stop it first" >&2; exit 1
  fi
  alive "$STATE/slurmctld.pid" || { slurmctld; log "started slurmctld"; }
  alive "$STATE/slurmd.pid" || { slurmd; log "started slurmd"; }
  local s=""
  for _ in $(seq 120); do s=$(node_state); [[ $s == idle || $s == mix || $s == alloc ]] && break; sleep 0.25; done
  if [[ $s != idle && $s != mix && $s != alloc ]]; then
    echo "local_slurm: node state '${s:-none}' after 30 s; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
    exit 1
  fi
  sinfo
}

down() {
  # Jobs first: a slurmstepd whose slurmd is gone would keep running its job's processes.
  if alive "$STATE/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
      log "cancelling jobs $jobs"
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 100); do [[ -z $(squeue -h -t R,CG -o %A 2>/dev/null) ]] && break; sleep 0.2; done
    fi
  fi
  stop_pidfile slurmd
  stop_pidfile slurmctld
  stop_pidfile munged
  if [[ -f $CONF.scaletrain-orig ]]; then mv "$CONF.scaletrain-orig" "$CONF"; log "restored the original $CONF"; fi
  rmdir "$STATE" 2>/dev/null || true
}

status() {
  local rc=0 d
  for d in munged slurmctld slurmd; do
    if alive "$STATE/$d.pid"; then echo "$d: running (pid $(cat "$STATE/$d.pid"))"
    elif [[ $d == munged ]] && munge -n >/dev/null 2>&1; then echo "munged: running (not started by us)"
    else echo "$d: not running"; rc=1; fi
  done
  if ((rc == 0)); then sinfo; squeue; fi
  return $rc
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
