#!/usr/bin/env bash
# Start what the backends need: binfmt for foreign architectures, the Docker engine and
# libvirtd.  Uses systemd where it runs; starts the daemons directly where it does not
# (containers, CI runners).  Safe to run again.  Run as root.
set -euo pipefail

have_systemd() { [ -d /run/systemd/system ]; }

if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
for arch in aarch64 arm; do
  update-binfmts --enable "qemu-$arch" >/dev/null 2>&1 || true
done
if [ "$(cat /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null | head -n1)" != "enabled" ]; then
  echo "services.sh: qemu-aarch64 binfmt is not enabled" >&2
  exit 1
fi

wait_for() {  # wait_for SECONDS COMMAND...
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  "$@"
}

if ! docker info >/dev/null 2>&1; then
  if have_systemd; then
    systemctl start docker
  else
    nohup dockerd --bridge=none --iptables=false --ip-masq=false \
      >/var/log/pytest-isolate-dockerd.log 2>&1 &
  fi
  wait_for 60 docker info
fi

# libvirtd probes QEMU with accel=kvm:tcg; where /dev/kvm exists but cannot run guests (no
# vmx/svm flag: a paravirtual KVM), that probe hangs.  There, libvirtd gets a private mount
# namespace in which /dev/kvm is /dev/null, so it settles on TCG.
kvm_usable() { grep -qE '\b(vmx|svm)\b' /proc/cpuinfo; }
if ! timeout 10 virsh -c qemu:///system version >/dev/null 2>&1; then
  pkill -x libvirtd 2>/dev/null || true
  if have_systemd && kvm_usable; then
    systemctl start libvirtd
  elif [ -e /dev/kvm ] && ! kvm_usable; then
    unshare -m --propagation private sh -c 'mount --bind /dev/null /dev/kvm && exec libvirtd -d'
  else
    libvirtd -d
  fi
  pgrep -x virtlogd >/dev/null || virtlogd -d
  wait_for 30 timeout 10 virsh -c qemu:///system version
fi
echo "services.sh: binfmt, docker and libvirtd are up"
