#!/bin/busybox sh
# vmpool guest init (PID 1 of the initramfs).
#
# Mounts the pseudo file systems and loads the kernel modules the guest needs
# (/lib/modules/vmpool/order, dependencies first: virtio-serial for the agent's
# ports, disk, network, RNG). Then:
#
#  - with root=/dev/XXX on the kernel command line, mounts that ext4 file
#    system (waiting up to 10 s for the device) and switches to it. A disk with
#    vmpool's agent as a systemd unit (the Debian disk) starts its own. Any
#    other disk (an OCI image's, a distribution's) gets this initramfs's
#    busybox and agent on a tmpfs at /.vmpool/guest: the agent is started,
#    chrooted into the disk, before its /sbin/init takes over (systemd stays
#    PID 1 and leaves processes it found alone); a disk with no /sbin/init
#    gets this script as PID 1 instead (running from /.vmpool/guest). If it
#    cannot, it says so in one line on the console and carries on as below,
#    so that the VM stays reachable.
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

# Run from /.vmpool/guest of a root disk (see carry below): "agent" is the agent's respawn
# loop next to the disk's own init; "image" is PID 1 of a disk that has none.
guest=/.vmpool/guest
case ${1-} in
agent)
	# Started just before the disk's init: wait (at most 10 s) until that init runs as PID 1
	# (its executable is on this disk, not the initramfs) and, if it is systemd, listens on
	# its private socket (what systemctl talks to). Readiness then comes once the disk's own
	# boot is under way, and a template is saved only after systemd has settled (the host
	# waits for that with systemctl).
	bb=$guest/bin/busybox
	disk=$($bb stat -c %d /)
	n=0
	while [ $n -lt 100 ]; do
		if [ "$($bb stat -L -c %d /proc/1/exe 2>/dev/null)" = "$disk" ]; then
			case $($bb readlink /proc/1/exe 2>/dev/null) in
			*/systemd) [ -S /run/systemd/private ] && break ;;
			*) break ;;
			esac
		fi
		$bb usleep 100000
		n=$((n + 1))
	done
	while :; do
		$guest/bin/vmpool-agent </dev/null >/dev/null 2>&1
		$guest/bin/busybox sleep 1
	done
	;;
image)
	bb=$guest/bin/busybox
	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$guest/bin:$guest/sbin:$guest/usr/bin:$guest/usr/sbin
	for d in run dev/shm; do
		if [ -d /$d ] && ! $bb mountpoint -q /$d; then
			$bb mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /$d 2>/dev/null
		fi
	done
	$bb chmod 0755 /run 2>/dev/null
	$bb ip link set lo up 2>/dev/null
	echo "vmpool-guest: ready" >/dev/console 2>/dev/null
	(
		while :; do
			$guest/bin/vmpool-agent </dev/null >/dev/null 2>&1
			$bb sleep 1
		done
	) &
	shell=$bb
	[ -x /bin/sh ] && shell=
	while :; do
		if [ -c /dev/hvc0 ]; then
			$bb setsid -c $shell sh -l </dev/hvc0 >/dev/hvc0 2>&1
		fi
		$bb sleep 1
	done
	;;
esac

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

# True when the disk starts vmpool's agent itself (the Debian disk: a systemd unit).
own_agent() {
	w=/newroot/etc/systemd/system/sysinit.target.wants/vmpool-agent.service
	[ -x /newroot/usr/local/sbin/vmpool-agent ] && { [ -L $w ] || [ -e $w ]; }
}

# Puts busybox, its applet links, the agent and this script on a tmpfs at
# /newroot/.vmpool/guest (the directory is made on the disk if it is missing).
carry() {
	[ -L /newroot/.vmpool ] && return 1
	$bb mkdir -p /newroot$guest 2>/dev/null || return 1
	[ -L /newroot$guest ] && return 1
	$bb mount -t tmpfs -o mode=0755,nodev tmpfs /newroot$guest 2>/dev/null || return 1
	$bb cp -a /bin /sbin /usr /init /newroot$guest/ 2>/dev/null
}

move_mounts() {
	for fs in dev proc sys; do
		$bb mkdir -p /newroot/$fs 2>/dev/null
		$bb mount --move /$fs /newroot/$fs 2>/dev/null
	done
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
	elif own_agent; then
		if has_init; then
			move_mounts
			exec $bb switch_root /newroot /sbin/init
		fi
		$bb umount /newroot 2>/dev/null
		say "$root has no /sbin/init; staying in the initramfs"
	elif ! carry; then
		$bb umount /newroot/.vmpool/guest 2>/dev/null
		$bb umount /newroot 2>/dev/null
		say "cannot put the agent on $root (/.vmpool/guest); staying in the initramfs"
	elif has_init; then
		move_mounts
		$bb chroot /newroot $guest/bin/busybox sh $guest/init agent </dev/null >/dev/null 2>&1 &
		exec $bb switch_root /newroot /sbin/init
	else
		move_mounts
		exec $bb switch_root /newroot $guest/bin/busybox sh $guest/init image
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
