#!/bin/bash
# Two "hosts" on this machine for multi-node DeepSpeed tests: network namespaces joined by a bridge, each
# with its own hostname, PID namespace and sshd. They share the filesystem, so the repo and venv are at the
# same paths everywhere (as on a cluster with a shared filesystem).
#
#   scripts/local_cluster.sh up       install openssh-server + pdsh if missing, start host1/host2 (idempotent)
#   scripts/local_cluster.sh status   namespaces, sshd PIDs, ssh reachability
#   scripts/local_cluster.sh down     kill by namespace PID lists (never by name), delete namespaces, files
#
# After `up`:  ssh host1 true;  pdsh -w host1,host2 hostname;
#   DS_ENV_FILE=$DIR/deepspeed_env deepspeed --hostfile $DIR/hostfile launch/train.py --config ...
# (DIR is printed; default /run/scaletrain-cluster). SCALETRAIN_VENV (default /work/venv) goes into
# deepspeed_env's PATH. Recipe and pitfalls: /work/shared/reference/local-cluster.md.
#
# Layout: root namespace  bridge br-st 10.201.0.1/24;  host1 = 10.201.0.11, host2 = 10.201.0.12 (eth0 inside).
# Only these self-made addresses are ever used. Needs root.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SCALETRAIN_VENV:-/work/venv}
DIR=${SCALETRAIN_CLUSTER_DIR:-/run/scaletrain-cluster}
HOSTS=(host1 host2)
NS_PREFIX=st-                          # namespace names: st-host1, st-host2 (distinct from other users')
BR=br-st
NET=10.201.0
SSH_CONF=/etc/ssh/ssh_config.d/scaletrain-cluster.conf   # a drop-in: no edit of anyone's ~/.ssh/config
PDSH_DEFAULT=/etc/pdsh/rcmd_default                      # Debian pdsh defaults to rsh; make `pdsh -w` use ssh

log() { echo "local_cluster: $*"; }
ip_of() { echo "$NET.$((10 + $1))"; }  # ip_of INDEX(1-based)
has_ns() { ip netns list | grep -q "^$1\b"; }

install_packages() {
  local missing=()
  for p in openssh-server openssh-client pdsh iproute2 procps; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  for _ in $(seq 60); do apt-get update -qq && break; sleep 5; done   # lists lock: retry
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
}

healthy() {   # every host: namespace, live sshd, passwordless ssh
  local h
  for h in "${HOSTS[@]}"; do
    has_ns "$NS_PREFIX$h" || return 1
    [[ -s $DIR/$h.pid ]] && kill -0 "$(cat "$DIR/$h.pid")" 2>/dev/null || return 1
    ssh -o ConnectTimeout=2 "$h" true 2>/dev/null || return 1
  done
}

make_keys() {
  if [[ -d $DIR && ! -e $DIR/id_ed25519 && -n $(ls -A "$DIR") ]]; then  # `down` deletes $DIR: never someone's dir
    echo "local_cluster: $DIR exists and is not ours; set SCALETRAIN_CLUSTER_DIR to a new directory" >&2; exit 2
  fi
  mkdir -p "$DIR" && chmod 700 "$DIR"
  ssh-keygen -q -t ed25519 -N '' -C scaletrain-cluster -f "$DIR/id_ed25519"
  cp "$DIR/id_ed25519.pub" "$DIR/authorized_keys"   # sshd reads it from here: root's ~/.ssh stays untouched
  : > "$DIR/known_hosts"
  local i=0 h
  for h in "${HOSTS[@]}"; do   # one host key per host, pinned in our own known_hosts (no blind trust)
    i=$((i + 1))
    ssh-keygen -q -t ed25519 -N '' -C "$h" -f "$DIR/$h.host_key"
    echo "$h,$(ip_of $i) $(cut -d' ' -f1,2 "$DIR/$h.host_key.pub")" >> "$DIR/known_hosts"
  done
}

write_ssh_config() {
  local i=0 h
  {
    echo "# written by $REPO/scripts/local_cluster.sh up; removed by down"
    for h in "${HOSTS[@]}"; do i=$((i + 1)); printf 'Host %s\n    HostName %s\n' "$h" "$(ip_of $i)"; done
    echo "Host ${HOSTS[*]} $NET.*"
    cat <<CFG
    User root
    IdentityFile $DIR/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $DIR/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    LogLevel ERROR
CFG
  } > "$SSH_CONF"
  if [[ ! -e $PDSH_DEFAULT ]]; then
    mkdir -p "$(dirname "$PDSH_DEFAULT")" && echo ssh > "$PDSH_DEFAULT" && touch "$DIR/created-pdsh-default"
  fi
}

write_job_files() {
  local i=0 h
  : > "$DIR/hostfile"
  for h in "${HOSTS[@]}"; do echo "$h slots=1" >> "$DIR/hostfile"; done
  # DeepSpeed forwards only PYTHON*/MLFLOW*/... variables to the hosts; the rest comes from this file
  # (DS_ENV_FILE=<abs path>). One KEY=VALUE per line, no blank lines: the runner splits every line at '='.
  # GLOO_SOCKET_IFNAME: gloo must use the host's own eth0 address, never a loopback one.
  # PATH: the venv goes LAST. DeepSpeed JIT-builds ops (CPU Adam for optimizer offload) with the first ninja on
  # PATH; the venv's pip ninja hashes commands differently from /usr/bin/ninja, so runs with different PATHs
  # would rebuild each other's op (~1 min each time).
  cat > "$DIR/deepspeed_env" <<ENV
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$VENV/bin
PYTHONPATH=$REPO
DS_ACCELERATOR=cpu
GLOO_SOCKET_IFNAME=eth0
ENV
}

start_host() {   # start_host INDEX NAME
  local i=$1 h=$2 ns=$NS_PREFIX$2 ip
  ip=$(ip_of "$i")
  ip netns add "$ns"
  ip link add "veth-$h" type veth peer name eth0 netns "$ns"   # eth0 inside every host (gloo/MPI defaults)
  ip link set "veth-$h" master "$BR" up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" ip addr add "$ip/24" dev eth0
  ip netns exec "$ns" ip link set eth0 up
  # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts: names resolve to the bridge
  # addresses inside, and the own hostname is not 127.0.x.x (gloo would advertise loopback otherwise).
  mkdir -p "/etc/netns/$ns"
  { echo "127.0.0.1 localhost"; local j=0 m; for m in "${HOSTS[@]}"; do j=$((j + 1)); echo "$(ip_of $j) $m"; done; } \
    > "/etc/netns/$ns/hosts"
  # Own UTS namespace (hostname) and PID namespace: DeepSpeed's Ctrl-C cleanup runs `pkill -f` on every host,
  # which must not reach processes outside it. sshd runs in the foreground as the namespace's PID 1.
  nohup ip netns exec "$ns" unshare --uts --pid --fork --mount-proc \
    sh -c "hostname $h && exec /usr/sbin/sshd -D -f /dev/null -h $DIR/$h.host_key -o ListenAddress=$ip \
      -o PidFile=none -o AuthorizedKeysFile=$DIR/authorized_keys -o PermitRootLogin=prohibit-password \
      -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o UsePAM=no \
      -o Subsystem='sftp internal-sftp'" > "$DIR/$h.log" 2>&1 &
  echo $! > "$DIR/$h.pid"   # the unshare process; ip netns pids lists everything of the host anyway
}

up() {
  [[ $(id -u) == 0 ]] || { echo "local_cluster: needs root" >&2; exit 1; }
  install_packages
  if healthy; then
    log "already up"
  else
    down >/dev/null 2>&1 || true   # half-built from an earlier run: start clean
    make_keys
    ip link add "$BR" type bridge
    ip addr add "$NET.1/24" dev "$BR"
    ip link set "$BR" up
    mkdir -p /run/sshd   # sshd's privilege-separation dir (normally made by the init system)
    local i=0 h
    for h in "${HOSTS[@]}"; do i=$((i + 1)); start_host "$i" "$h"; done
    write_ssh_config
    for h in "${HOSTS[@]}"; do
      for _ in $(seq 50); do ssh -o ConnectTimeout=2 "$h" true 2>/dev/null && break; sleep 0.2; done
      ssh "$h" true || { echo "local_cluster: ssh $h failed; see $DIR/$h.log" >&2; exit 1; }
    done
  fi
  write_job_files   # cheap, and picks up a changed SCALETRAIN_VENV
  local h
  for h in "${HOSTS[@]}"; do log "$h: $(ssh "$h" 'echo $(hostname) $(hostname -I)')"; done
  log "hostfile: $DIR/hostfile"
  log "env file: $DIR/deepspeed_env (export DS_ENV_FILE=$DIR/deepspeed_env)"
}

down() {
  local h ns pids
  for h in "${HOSTS[@]}"; do
    ns=$NS_PREFIX$h
    if has_ns "$ns"; then
      # Everything in the host, by PID (its sshd, ssh sessions, ranks started over ssh), never by name.
      pids=$(ip netns pids "$ns" | tr '\n' ' ')
      [[ -n ${pids// /} ]] && kill $pids 2>/dev/null || true
      for _ in $(seq 20); do [[ -z $(ip netns pids "$ns") ]] && break; sleep 0.1; done
      pids=$(ip netns pids "$ns" | tr '\n' ' ')
      [[ -n ${pids// /} ]] && kill -9 $pids 2>/dev/null || true
      for _ in $(seq 100); do [[ -z $(ip netns pids "$ns") ]] && break; sleep 0.1; done
      ip netns del "$ns"
      log "removed $h"
    fi
    # The veth pair lives as long as the namespace does (a dying process can hold it after `netns del`);
    # deleting our end removes both, so the next `up` can create it again.
    ip link show "veth-$h" >/dev/null 2>&1 && ip link del "veth-$h" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  rmdir /etc/netns 2>/dev/null || true
  ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR"
  rm -f "$SSH_CONF"
  if [[ -e $DIR/created-pdsh-default ]]; then rm -f "$PDSH_DEFAULT"; rmdir "$(dirname "$PDSH_DEFAULT")" 2>/dev/null || true; fi
  [[ -e $DIR/id_ed25519 || ! -e $DIR ]] && rm -rf "$DIR"   # only the dir `up` made (its key marks it)
  log "down"
}

status() {
  local h ns rc=0
  for h in "${HOSTS[@]}"; do
    ns=$NS_PREFIX$h
    if ! has_ns "$ns"; then echo "$h: no namespace"; rc=1; continue; fi
    if ssh -o ConnectTimeout=2 "$h" true 2>/dev/null; then
      echo "$h: up ($(ssh "$h" hostname -I | tr -d ' \n')), processes: $(ip netns pids "$ns" | tr '\n' ' ')"
    else echo "$h: namespace exists, ssh fails"; rc=1; fi
  done
  ((rc == 0)) && echo "hostfile: $DIR/hostfile"
  return $rc
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
