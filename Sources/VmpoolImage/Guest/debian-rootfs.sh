#!/usr/bin/env bash
# Build vmpool's Debian 12 (bookworm) root disk: one ext4 file system (label
# vmpool-root, no partition table) in a qcow2 file, booted by QEMU with the
# Debian cloud kernel (-kernel), vmpool's busybox initramfs and root=/dev/vda.
#
# usage: debian-rootfs.sh --output FILE.qcow2 --agent AGENT [--size 4G]
#                         [--mirror URL] [--security-mirror URL|none]
#                         [--packages a,b,...] [--cache DIR]
#
#   --output   the qcow2 file to write; replaced atomically at the end
#   --agent    the static vmpool guest agent, installed as /usr/local/sbin/vmpool-agent
#   --size     virtual size of the disk (default 4G; K, M, G or T)
#   --mirror   Debian archive for bookworm and bookworm-updates
#              (default http://deb.debian.org/debian)
#   --security-mirror  archive for bookworm-security
#              (default http://deb.debian.org/debian-security; "none" leaves it out)
#   --packages extra Debian packages, comma-separated
#   --cache    directory kept across builds: the .deb files and apt lists of
#              the last build, so that a rebuild downloads only what changed
#
# The system: mmdebstrap's minbase variant (Essential and Priority: required,
# which includes apt) plus systemd, systemd-sysv, udev, python3, iproute2,
# procps, ca-certificates and netbase; no Recommends, no documentation, man
# pages or translations (the dpkg path excludes stay in the image for later
# installs). Merged /usr comes from mmdebstrap's merged-usr hook rather than
# the usrmerge package, which would bring 46 MiB of Perl. Root has no password
# and is logged in automatically on the interactive console only (hvc0). The agent runs as vmpool-agent.service from the start of
# sysinit.target with no default dependencies: it finds its virtio-serial ports
# itself and configures eth0 itself, so nothing else configures the network
# (no DHCP client, interface names stay eth0...). The journal is kept in memory.
# Units a CI VM does not need (timers, logind, getty on tty1, ...) are masked,
# and so are generators with nothing to do; the build prints the masked units.
# /etc/machine-id is empty (and is never committed: systemd's transient one
# in /run serves, and the agent writes each VM's there).
#
# Runs as root (mmdebstrap's root mode). As another user it uses mmdebstrap's
# unshare mode, which needs unprivileged user namespaces and ranges in
# /etc/subuid and /etc/subgid. Needs mmdebstrap, e2fsprogs and qemu-utils; as
# root it installs what is missing with apt-get.
#
# Progress goes to stderr; stdout gets only the output path, at the end. No
# loop devices: mkfs.ext4 -d fills the file system from the unpacked tree.
set -euo pipefail

prog=debian-rootfs
say() { printf '%s: [%3ds] %s\n' "$prog" "$SECONDS" "$*" >&2; }
die() {
	printf '%s: error: %s\n' "$prog" "$*" >&2
	exit 1
}
usage() {
	sed -n '/^# usage:/,/only what changed$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit "${1:-2}"
}

output='' agent='' size=4G cache='' packages=''
mirror=http://deb.debian.org/debian
security=http://deb.debian.org/debian-security
while [ $# -gt 0 ]; do
	opt=$1
	case $opt in
	--*=*)
		set -- "${opt%%=*}" "${opt#*=}" "${@:2}"
		continue
		;;
	-h | --help) usage 0 ;;
	--output | --agent | --size | --mirror | --security-mirror | --packages | --cache)
		[ $# -ge 2 ] || die "$opt needs a value"
		case $opt in
		--output) output=$2 ;;
		--agent) agent=$2 ;;
		--size) size=$2 ;;
		--mirror) mirror=$2 ;;
		--security-mirror) security=$2 ;;
		--packages) packages=$2 ;;
		--cache) cache=$2 ;;
		esac
		shift 2
		;;
	*) die "unknown argument: $opt (see --help)" ;;
	esac
done

[ -n "$output" ] || die "--output FILE.qcow2 is required"
[ -n "$agent" ] || die "--agent PATH is required"
[[ $size =~ ^[1-9][0-9]*[KMGT]?$ ]] || die "--size must be a number with an optional K, M, G or T suffix, got '$size'"
url_re='^(https?|file)://[^[:space:]]+$'
[[ $mirror =~ $url_re ]] || die "--mirror must be an http, https or file URL, got '$mirror'"
[ "$security" = none ] || [[ $security =~ $url_re ]] ||
	die "--security-mirror must be an http, https or file URL or 'none', got '$security'"

# The package set. Extra names are checked against Debian's package name rules;
# they reach mmdebstrap as one argument and never a shell.
include=(systemd systemd-sysv udev python3 iproute2 procps ca-certificates netbase)
if [ -n "$packages" ]; then
	IFS=, read -r -a extra <<<"$packages"
	for p in "${extra[@]}"; do
		[[ $p =~ ^[a-z0-9][a-z0-9.+-]+$ ]] || die "--packages: '$p' is not a Debian package name"
		include+=("$p")
	done
fi

# The agent must be a static ELF executable: the image does not have to carry
# the libraries of whatever system compiled it.
{ [ -f "$agent" ] && [ -r "$agent" ]; } || die "agent $agent is not a readable file"
elf_u() { od -An -t "u$2" -j "$1" -N "$2" -- "$agent" | tr -d ' \n'; }
[ "$(head -c 5 -- "$agent" | od -An -c | tr -d ' \n')" = '177ELF002' ] ||
	die "agent $agent is not a 64-bit ELF executable"
phoff=$(elf_u 32 8) phentsize=$(elf_u 54 2) phnum=$(elf_u 56 2)
for ((i = 0; i < phnum; i++)); do
	[ "$(elf_u $((phoff + i * phentsize)) 4)" != 3 ] ||
		die "agent $agent is dynamically linked; build it with -static"
done

# Privileges: root mode as root, unshare mode otherwise.
if [ "$(id -u)" = 0 ]; then
	mode=root
	as_root=()
else
	mode=unshare
	as_root=(mmdebstrap --unshare-helper)
fi

missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
if [ ${#missing[@]} -gt 0 ]; then
	[ "$mode" = root ] || die "missing ${missing[*]}; install them as root (apt-get install ${missing[*]})"
	say "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
		die "apt-get install ${missing[*]} failed (run apt-get update first?)"
fi
if [ "$mode" = unshare ]; then
	mmdebstrap --unshare-helper true 2>/dev/null ||
		die "must run as root, or as a user who can use mmdebstrap's unshare mode (user namespaces, /etc/subuid and /etc/subgid ranges)"
fi

case $output in
*/*) outdir=${output%/*} ;;
*) outdir=. ;;
esac
[ -d "$outdir" ] || die "directory ${outdir:-/} of --output does not exist"
outdir=$(cd "${outdir:-/}" && pwd)
output=$outdir/${output##*/}
agent=$(cd "$(dirname -- "$agent")" && pwd)/$(basename -- "$agent")
if [ -n "$cache" ]; then
	mkdir -p -- "$cache" || die "cannot create cache directory $cache"
	cache=$(cd "$cache" && pwd)
fi

# Everything temporary lives in one directory next to the output, so the final
# rename stays on one file system. Others may pass through it (apt downloads as
# _apt into the tree; in unshare mode the namespace's root is a subordinate
# uid) but not list it. mmdebstrap runs in the background, in a process group
# of its own, so that a signal reaches this script at once; cleanup stops the
# whole group (mmdebstrap unmounts what it mounted in the tree) and waits for
# it before anything is deleted.
tmp=$(mktemp -d "$outdir/.${output##*/}.XXXXXX") || die "cannot create a temporary directory in $outdir"
chmod 0711 "$tmp"
child=
# Removes a tree that may hold files of the namespace's users (unshare mode).
remove() {
	"${as_root[@]}" rm -rf --one-file-system -- "$@" 2>/dev/null || true
	rm -rf --one-file-system -- "$@" 2>/dev/null || true
}
cleanup() {
	local status=$?
	trap - EXIT INT TERM HUP
	if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
		say "stopping mmdebstrap"
		kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null || true
		wait "$child" 2>/dev/null || true
	fi
	if grep -qF " $tmp/" /proc/self/mounts 2>/dev/null; then
		say "file systems are still mounted under $tmp; not removing it"
	else
		remove "$tmp"
	fi
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

rootdir=$tmp/root
hooks=$tmp/hooks
mkdir -p "$hooks"
cp -- "$agent" "$tmp/vmpool-agent"

# The customize hook is fixed text run outside the chroot as (namespace) root
# with the tree as $1. Files cross between the tree and this side only through
# mmdebstrap's special hooks (upload, sync-in, sync-out), which run as the
# caller; their paths are relative to $tmp, mmdebstrap's working directory, so
# no path of the caller's ever goes through a shell or a word split.
cat >"$hooks/customize50-vmpool" <<'EOF'
#!/bin/sh
# Turn the minbase tree into vmpool's guest system.
set -eu
exec >&2
root=$1

chown 0:0 "$root/usr/local/sbin/vmpool-agent"
chmod 0755 "$root/usr/local/sbin/vmpool-agent"
cat >"$root/etc/systemd/system/vmpool-agent.service" <<'UNIT'
[Unit]
Description=vmpool guest agent
# Started with the first units of the boot: it needs neither udev nor the
# network (it finds its virtio-serial ports in /sys/class/virtio-ports and
# configures eth0 itself).
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/local/sbin/vmpool-agent
Restart=always
RestartSec=100ms
Environment=HOME=/root LANG=C.UTF-8
WorkingDirectory=/root
# CI jobs run under the agent, in its cgroup.
TasksMax=infinity
# While the system boots, the agent is the first service forked (systemd
# dispatches jobs by CPU weight) and has the larger share of the CPU.
StartupCPUWeight=1000

[Install]
WantedBy=sysinit.target
UNIT
chroot "$root" systemctl enable vmpool-agent.service

# Logged in as root, without a password, on the interactive console only (hvc0,
# the virtio console `vmpool console` attaches to). The serial console (ttyS0)
# carries the kernel's and systemd's messages into the log vmpool keeps.
mkdir -p "$root/etc/systemd/system/serial-getty@hvc0.service.d"
cat >"$root/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart=-/sbin/agetty -o '-p -f -- \\u' --noclear --autologin root --keep-baud 115200,57600,38400,9600 - $TERM
UNIT

# Generators run at every boot, about 0.1 s each under TCG, before any unit
# starts. Only the fstab generator has work here: no encrypted, verity or
# integrity volumes, GPT, hibernation, SysV scripts, rc.local or offline
# updates. The console getty the getty generator would add is enabled instead.
mkdir -p "$root/etc/systemd/system-generators"
for gen in cryptsetup debug getty gpt-auto hibernate-resume integritysetup rc-local run \
	system-update sysv veritysetup; do
	ln -sfn /dev/null "$root/etc/systemd/system-generators/systemd-$gen-generator"
done
chroot "$root" systemctl enable --quiet serial-getty@hvc0.service

# The journal stays in memory.
mkdir -p "$root/etc/systemd/journald.conf.d"
cat >"$root/etc/systemd/journald.conf.d/vmpool.conf" <<'UNIT'
[Journal]
Storage=volatile
RuntimeMaxUse=16M
UNIT
rm -rf "$root/var/log/journal"

# Interfaces keep the kernel's names (eth0): no predictable renaming by udev.
mkdir -p "$root/etc/systemd/network"
ln -sfn /dev/null "$root/etc/systemd/network/99-default.link"

echo vmpool >"$root/etc/hostname"
chmod 0644 "$root/etc/hostname"
cat >"$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	vmpool
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
HOSTS
# The initramfs mounts the root read-write; remount-fs adds noatime, so that
# reading files does not write to every clone's disk.
printf '/dev/vda\t/\text4\tdefaults,noatime\t0\t0\n' >"$root/etc/fstab"

# Masked: what a CI VM does not need, and what only costs boot time under TCG.
# Masked rather than disabled, so that neither a preset run nor a package
# upgrade enables them again.
mask=
# Periodic jobs.
mask="$mask apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service"
mask="$mask dpkg-db-backup.timer dpkg-db-backup.service e2scrub_all.timer e2scrub_all.service"
mask="$mask e2scrub_reap.service fstrim.timer fstrim.service man-db.timer logrotate.timer"
# Network and time: the agent configures eth0, the host sets the clock.
mask="$mask systemd-networkd.service systemd-networkd.socket systemd-networkd-wait-online.service"
mask="$mask systemd-network-generator.service systemd-resolved.service systemd-timesyncd.service"
mask="$mask networking.service"
# Logins: no D-Bus, so no logind; getty-static would start gettys on tty2-6 for
# want of it. The one login is the interactive console's (hvc0); a getty on the
# serial console (ttyS0) would only print prompts into the log.
mask="$mask systemd-logind.service getty-static.service getty@tty1.service serial-getty@ttyS0.service"
mask="$mask systemd-update-utmp.service systemd-update-utmp-runlevel.service"
# The root file system has no /lib/modules (the initramfs loads the modules the
# VM needs), so loading modules at boot only fails; nor do these mounts work
# without their modules, or matter to a CI job.
mask="$mask modprobe@configfs.service modprobe@dm_mod.service modprobe@drm.service"
mask="$mask modprobe@efi_pstore.service modprobe@fuse.service modprobe@loop.service"
mask="$mask sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount"
mask="$mask sys-fs-fuse-connections.mount dev-hugepages.mount proc-sys-fs-binfmt_misc.automount"
mask="$mask systemd-modules-load.service"
# The journal is volatile: nothing to flush to /var.
mask="$mask systemd-journal-flush.service"
# The host reseeds the RNG of every VM; a seed file shared by all clones is no
# use, and saving one writes to every clone's disk. First-boot prompts
# (locale, timezone, root password) would stop the boot of an image whose
# machine-id says "uninitialized".
mask="$mask systemd-random-seed.service systemd-firstboot.service"
# The machine-id systemd makes up at boot stays where it puts it, in /run, bind-
# mounted over the empty /etc/machine-id, and a clone's new one goes there too:
# committing it to the disk would make every clone's first write to ext4 part of
# its start (see identity_on_tmpfs in the agent).
mask="$mask systemd-machine-id-commit.service"
masked=
for unit in $mask; do
	base=$unit
	case $unit in *@?*) base=${unit%%@*}@.service ;; esac
	if [ -e "$root/lib/systemd/system/$base" ] || [ -e "$root/usr/lib/systemd/system/$base" ]; then
		masked="$masked $unit"
	fi
done
# shellcheck disable=SC2086 # unit names, split on purpose
chroot "$root" systemctl mask --quiet $masked

# A generic image: no machine-id, no random seed, no host keys.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root/var/lib/systemd/random-seed"

# /etc and /var count as updated for this /usr (what systemd-update-done, which
# Debian does not ship, would write), so that systemd-sysusers does not run at
# every boot of a new clone.
nsec=$(chroot "$root" stat -c %.9Y /usr | tr -d .)
for dir in etc var; do
	printf '%s\n' "# This file was created by systemd-update-done. Its only" \
		"# purpose is to hold a timestamp of the time this directory" \
		"# was updated. See man:systemd-update-done.service(8)." \
		"TIMESTAMP_NSEC=$nsec" >"$root/$dir/.updated"
	touch -r "$root/usr" "$root/$dir/.updated"
done
exit 0
EOF
chmod 0755 "$hooks/customize50-vmpool"

sources=("deb $mirror bookworm main" "deb $mirror bookworm-updates main")
[ "$security" = none ] || sources+=("deb $security bookworm-security main")

mmopts=(
	--mode="$mode" --variant=minbase --format=directory
	--include="$(
		IFS=,
		echo "${include[*]}"
	)"
	--aptopt='Acquire::Languages "none"'
	--dpkgopt='path-exclude=/usr/share/man/*'
	--dpkgopt='path-exclude=/usr/share/info/*'
	--dpkgopt='path-exclude=/usr/share/locale/*'
	--dpkgopt='path-include=/usr/share/locale/locale.alias'
	--dpkgopt='path-exclude=/usr/share/doc/*'
	--dpkgopt='path-include=/usr/share/doc/*/copyright'
	--dpkgopt='path-exclude=/usr/share/lintian/*'
	--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
	--customize-hook='upload vmpool-agent /usr/local/sbin/vmpool-agent'
	--hook-dir="$hooks"
)
# The cache: last build's packages and lists in, this build's out. Packages
# of the Essential set stay in apt's cache for that (essential/unlink).
if [ -n "$cache" ]; then
	mkdir -p "$cache/archives" "$cache/lists" "$tmp/cache-out/archives" "$tmp/cache-out/lists"
	ln -s "$cache" "$tmp/cache-in"
	# shellcheck disable=SC2016 # $1 is for the hook's shell
	mmopts+=(
		--skip=essential/unlink
		--setup-hook='mkdir -p "$1/var/cache/apt/archives" "$1/var/lib/apt/lists"'
		--setup-hook='sync-in cache-in/archives /var/cache/apt/archives'
		--setup-hook='sync-in cache-in/lists /var/lib/apt/lists'
		--customize-hook='sync-out /var/cache/apt/archives cache-out/archives'
		--customize-hook='sync-out /var/lib/apt/lists cache-out/lists'
	)
fi

say "building bookworm with mmdebstrap ($mode mode): ${include[*]}"
(cd "$tmp" && exec setsid mmdebstrap "${mmopts[@]}" bookworm "$rootdir" "${sources[@]}" </dev/null >&2) &
child=$!
wait "$child" || die "mmdebstrap failed"
child=

# The installed packages, as apt names their files (name_version_arch.deb,
# the epoch's colon as %3a).
# shellcheck disable=SC2016 # a dpkg-query format
installed=$("${as_root[@]}" chroot "$rootdir" dpkg-query -W -f '${Package}_${Version}_${Architecture}.deb\n' |
	sed 's/:/%3a/g')

# The cache keeps the packages of this build, nothing else: other versions and
# packages no longer installed go.
if [ -n "$cache" ]; then
	say "updating the cache in $cache"
	for f in "$cache"/archives/*.deb; do
		[ -e "$f" ] || continue
		grep -qxF -- "${f##*/}" <<<"$installed" || rm -f -- "$f"
	done
	for f in "$tmp"/cache-out/archives/*.deb; do
		[ -e "$f" ] || continue
		[ -e "$cache/archives/${f##*/}" ] || ! grep -qxF -- "${f##*/}" <<<"$installed" ||
			mv -- "$f" "$cache/archives/"
	done
	# Only the index files: not apt's lock, partial/ or auxfiles/.
	find "$tmp/cache-out/lists" -mindepth 1 \( ! -type f -o -name lock \) -prune -exec rm -rf -- {} +
	rm -rf -- "$cache/lists.old"
	mv -- "$cache/lists" "$cache/lists.old"
	mv -- "$tmp/cache-out/lists" "$cache/lists"
	rm -rf -- "$cache/lists.old"
fi

used=$("${as_root[@]}" du -sxm "$rootdir" | cut -f1)
say "root file system: $used MiB, $(wc -l <<<"$installed") packages"
say "masked: $(find "$rootdir/etc/systemd/system" -maxdepth 1 -lname /dev/null -printf '%f\n' | sort | tr '\n' ' ')"

# Inode tables and journal are zeroed now rather than by the guest kernel after
# every boot of a clone; the zeros stay holes in the qcow2 file.
# In unshare mode mkfs.ext4 runs in the namespace (to see the tree's owners)
# as a subordinate uid: the image is writable for others then, under a name
# nobody can list.
say "making the ext4 file system ($size)"
img=$tmp/$(mktemp -u XXXXXXXXXXXX).img
truncate -s "$size" "$img"
[ "$mode" = root ] || chmod 0666 "$img"
"${as_root[@]}" mkfs.ext4 -q -F -L vmpool-root -m 0 -d "$rootdir" \
	-E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 "$img" "$size" >&2 ||
	die "mkfs.ext4 failed (is --size $size large enough for $used MiB?)"
remove "$rootdir"

say "converting to qcow2"
qemu-img convert -f raw -O qcow2 "$img" "$tmp/disk.qcow2" >&2 || die "qemu-img convert failed"
rm -f -- "$img"
chmod 0644 "$tmp/disk.qcow2"
mv -f -- "$tmp/disk.qcow2" "$output"
say "wrote $output ($(du -m -- "$output" | cut -f1) MiB on disk, virtual size $size)"
printf '%s\n' "$output"
