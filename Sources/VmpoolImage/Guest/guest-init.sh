#!/bin/busybox sh
# vmpool guest init (PID 1 of the initramfs).
#
# Mounts the pseudo file systems and loads the kernel modules the guest needs
# (/lib/modules/vmpool/order, dependencies first: virtio-serial for the agent's
# ports, disk, network, RNG). Then:
#
#  - with root=/dev/XXX on the kernel command line, mounts that ext4 file
#    system (waiting up to 10 s for the device) and switches to it; its own
#    init starts its own agent. If it cannot, it says so in one line on the
#    console and carries on as below, so that the VM stays reachable.
#  - otherwise brings up lo and runs the vmpool agent (it finds its
#    virtio-serial ports itself) and a shell on the interactive console (hvc0,
#    which `vmpool console` attaches to), each in a respawning loop. The
#    serial console (ttyS0, kept by QEMU in a bounded ring for `vmpool logs`)
#    gets one "vmpool-guest: ready" line.
#
# PID 1 never exits.

PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
bb=/bin/busybox

$bb mount -t proc proc /proc 2>/dev/null
$bb mount -t sysfs sysfs /sys 2>/dev/null
$bb mount -t devtmpfs devtmpfs /dev 2>/dev/null

# Applet links are normally in the image; create them if they are not.
[ -e /bin/stty ] || $bb --install -s 2>/dev/null

# Keep kernel messages off the console from here on.
echo 1 >/proc/sys/kernel/printk 2>/dev/null

$bb mkdir -p /dev/pts
$bb mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts 2>/dev/null

# Modules already loaded or built into the kernel fail to load again: ignored.
mods=/lib/modules/vmpool
if [ -r $mods/order ]; then
	while read -r m; do
		[ -n "$m" ] && $bb insmod "$mods/$m" 2>/dev/null
	done <$mods/order
fi

say() {
	echo "vmpool-guest: $*" >/dev/console 2>/dev/null
}

# True when /newroot has an executable /sbin/init (symlinks followed inside it).
has_init() {
	p=/sbin/init
	n=0
	while [ -L "/newroot$p" ] && [ $n -lt 10 ]; do
		t=$($bb readlink "/newroot$p")
		case $t in
		/*) p=$t ;;
		*) p=${p%/*}/$t ;;
		esac
		n=$((n + 1))
	done
	[ -f "/newroot$p" ] && [ -x "/newroot$p" ]
}

root=
read -r cmdline </proc/cmdline
set -f
for arg in $cmdline; do
	case $arg in
	root=/dev/*) root=${arg#root=} ;;
	esac
done
set +f

if [ -n "$root" ]; then
	n=0
	while [ ! -b "$root" ] && [ $n -lt 100 ]; do
		$bb usleep 100000
		n=$((n + 1))
	done
	$bb mkdir -p /newroot
	if [ ! -b "$root" ]; then
		say "root device $root did not appear within 10 s; staying in the initramfs"
	elif ! $bb mount -t ext4 -o rw "$root" /newroot 2>/dev/null; then
		say "cannot mount $root (ext4, read-write); staying in the initramfs"
	elif ! has_init; then
		$bb umount /newroot 2>/dev/null
		say "$root has no /sbin/init; staying in the initramfs"
	else
		for fs in dev proc sys; do
			$bb mkdir -p /newroot/$fs 2>/dev/null
			$bb mount --move /$fs /newroot/$fs 2>/dev/null
		done
		exec $bb switch_root /newroot /sbin/init
	fi
fi

$bb ip link set lo up 2>/dev/null

say ready

# The agent, respawned if it ever exits.
(
	while :; do
		/bin/vmpool-agent </dev/null >/dev/null 2>&1
		$bb sleep 1
	done
) &

# A shell on the interactive console, in its own session with hvc0 as controlling terminal
# (setsid -c: its stdin; cttyhack would take the kernel's console, ttyS0, whatever stdin is).
while :; do
	if [ -c /dev/hvc0 ]; then
		$bb setsid -c $bb sh -l </dev/hvc0 >/dev/hvc0 2>&1
	fi
	$bb sleep 1
done
