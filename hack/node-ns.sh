#!/usr/bin/env bash
# Runs a command (the tests that need a real node) where a kubelet, containerd and their pods
# can do what they do without touching this machine:
#   - a new network namespace: loopback plus an empty bridge holding the node address, so
#     the CNI bridge, iptables chains and every pod address exist only there and no packet
#     can leave the machine;
#   - a new mount namespace with fresh tmpfs on /run, /var/lib and /var/log, where the
#     kubelet and containerd keep their state (some of their paths are fixed), gone with it;
#   - a new PID namespace: when the command ends, or this script is killed, the kernel kills
#     every process started inside (kubelet, containerd, shims, containers).
# What namespaces cannot hold is put back here on exit: the global sysctls the kubelet
# rewrites, and the cgroups that runc and the kubelet create.
#
# Usage: hack/node-ns.sh COMMAND [ARG...]   (as root)
set -euo pipefail

NODE_IP=${BYOK_NODE_IP:-10.201.0.1}

if [ "${1:-}" = "--inside" ]; then
  shift
  ip link set lo up
  ip link add byok-node type bridge
  ip addr add "${NODE_IP}/24" dev byok-node
  ip link set byok-node up
  for dir in /run /var/lib /var/log; do
    mount -t tmpfs -o mode=755 byok-node "$dir"
  done
  mkdir -p /run/lock /run/byok-tmp
  # Temporary files too (the control plane's etcd data and keys) stay in the namespace.
  export BYOK_NODE_NS=1 BYOK_NODE_IP="$NODE_IP" TMPDIR=/run/byok-tmp
  exec "$@"
fi

[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: a node needs root (namespaces, mounts, cgroups)" >&2; exit 1; }

# One node at a time: two kubelets would share the host's kubepods cgroups and each would
# remove the other's pods as orphans. The lock is on this script (nothing to clean up).
exec 9<"$0"
flock -n 9 || { echo "$0: another test node is running (make cluster-down?)" >&2; exit 1; }

# Sysctls are global; the kubelet sets these (the kernel tunables it "protects").
sysctls=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
saved=()
for name in "${sysctls[@]}"; do saved+=("$name=$(sysctl -n "$name")"); done

# Cgroup directories the kubelet and runc create under each v1 hierarchy (or v2's root).
cgroup_dirs() {
  for hierarchy in /sys/fs/cgroup /sys/fs/cgroup/*/; do
    for name in kubepods kubepods.slice; do
      if [ -d "$hierarchy/$name" ]; then echo "${hierarchy%/}/$name"; fi
    done
  done
}
existing_cgroups=$(cgroup_dirs | sort)

restore() {
  local status=$?
  # A second signal must not cut the restore short.
  trap '' INT TERM PIPE
  if [ -n "${child:-}" ]; then kill -KILL "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi
  for kv in "${saved[@]}"; do sysctl -qw "$kv" || echo "$0: could not restore $kv" >&2; done
  # With the namespace's init gone the kernel kills everything inside; the cgroups empty a
  # moment later. Remove only what this run created, deepest first.
  local deadline=$((SECONDS + 10)) left
  while :; do
    left=$(comm -13 <(echo "$existing_cgroups") <(cgroup_dirs | sort))
    for dir in $left; do find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true; done
    left=$(comm -13 <(echo "$existing_cgroups") <(cgroup_dirs | sort))
    [ -z "$left" ] && break
    if [ $SECONDS -ge $deadline ]; then echo "$0: cgroups left behind: $left" >&2; break; fi
    sleep 0.2
  done
  exit "$status"
}
trap restore EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# In the background so that a signal to this script is handled at once (bash runs traps
# only between foreground commands). --pdeathsig: if this script dies, even of SIGKILL, so does
# unshare; --kill-child: if unshare dies, the namespace's init
# gets SIGKILL, and with it every process in the PID namespace.
setpriv --pdeathsig KILL unshare --net --mount --propagation private --pid --fork --kill-child --mount-proc \
  bash "$0" --inside "$@" <&0 &
child=$!
# unshare itself holds the new network and mount namespaces: `nsenter -t PID -n` enters them.
[ -z "${BYOK_NODE_NS_PIDFILE:-}" ] || echo "$child" >"$BYOK_NODE_NS_PIDFILE"
rc=0
wait "$child" || rc=$?
child= # reaped: its pid may be reused
exit "$rc"
