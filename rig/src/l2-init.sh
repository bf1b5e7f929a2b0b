#!/bin/busybox sh
# /init of the rig's L2 (the nested-KVM Linux under QEMU TCG). Built into the L2
# initramfs by rig/src/initrd.rs; the agent it starts is rig/src/l2-agent.sh.
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# /work and /tmp stay on the rootfs, itself a tmpfs (no root= on the cmdline), so the
# files the host placed under them are there. O_DIRECT fails on tmpfs: use /data.
mkdir -p /work /tmp /run /root /var/tmp /data
chmod 1777 /tmp

# Dependency order, computed on the host (rig/src/modules.rs).
while read -r ko; do
	insmod "/lib/modules/rig/$ko" || echo "rig-l2: insmod $ko failed"
done </lib/modules/rig/order

echo always >/sys/kernel/mm/transparent_hugepage/enabled
ip link set lo up

for arg in $(cat /proc/cmdline); do
	case "$arg" in
	rig.ip=*) rig_ip=${arg#rig.ip=} ;;
	esac
done
if [ -n "${rig_ip:-}" ]; then
	ip addr add "$rig_ip" dev eth0 && ip link set eth0 up
fi
# The data disk (a host-made ext4 image on virtio-blk-pci); its node may lag the probe.
if grep -q ' vda$' /proc/partitions; then
	for _ in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
	mount -t ext4 /dev/vda /data || echo "rig-l2: mounting /dev/vda on /data failed"
fi

RIG_KVM=0
RIG_NPT=0
[ -c /dev/kvm ] && RIG_KVM=1
dmesg | grep -q 'Nested Paging enabled' && RIG_NPT=1
export RIG_KVM RIG_NPT
echo "rig-l2: kvm=$RIG_KVM npt=$RIG_NPT uptime=$(cut -d' ' -f1 /proc/uptime)"

# The agent gets its own session without a controlling tty: nothing it starts is
# ever sent SIGHUP or stopped for tty access.
setsid sh /rig/agent.sh </dev/ttyS1 >/dev/ttyS1 2>&1 &

# PID 1 must not exit; each wait inside `sleep` also reaps orphaned children.
while :; do sleep 3600; done
