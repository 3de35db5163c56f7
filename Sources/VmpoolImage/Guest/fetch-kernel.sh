#!/usr/bin/env bash
# Fetch the Debian guest kernel for vmpool and print the path of its vmlinuz.
#
# usage: fetch-kernel.sh CACHE_DIR
#   (scripts/fetch-kernel passes .cache/kernel of the checkout; `vmpool image build`
#   runs this script, embedded in the binary, with $XDG_CACHE_HOME/vmpool/kernel)
#
# The kernel package is resolved from a Debian metapackage (default
# linux-image-cloud-amd64: LZ4-compressed, boots about 2 s faster under TCG
# than linux-image-amd64 and supports ACPI CPU and memory hotplug), fetched
# with `apt-get download` and unpacked with `dpkg-deb -x`. Kept of the
# package: boot/ (vmlinuz, config, System.map) and, in modules/, the modules
# the guest needs (Debian builds the virtio drivers as modules) with their
# dependencies, flat, as NAME.ko, plus modules/order listing them one per line
# in load order (dependencies first) for the initramfs to insmod. Reuses an
# existing download or unpacked kernel; a kernel unpacked without modules/ is
# unpacked again. Override the metapackage with VMPOOL_KERNEL_META and the
# module list with VMPOOL_KERNEL_MODULES (space-separated names).
#
# Needs apt package lists (`apt-get update`) unless the kernel is cached.
# Dependencies are read with modinfo (kmod) where installed, else straight from
# the modules' .modinfo strings.
set -euo pipefail

[ $# -eq 1 ] && [ -n "$1" ] || {
	echo "usage: fetch-kernel.sh CACHE_DIR" >&2
	exit 2
}
cache=$1
meta=${VMPOOL_KERNEL_META:-linux-image-cloud-amd64}
# virtio-serial (the agent's ports), disk, network and RNG; dependencies are added.
wanted=${VMPOOL_KERNEL_MODULES:-virtio virtio_ring virtio_pci virtio_pci_legacy_dev virtio_pci_modern_dev virtio_console virtio_blk virtio_net net_failover failover virtio-rng}

die() {
	echo "fetch-kernel: $*" >&2
	exit 1
}

# Print the last existing path of the arguments in version order.
newest() {
	local f
	for f in "$@"; do
		if [ -e "$f" ]; then
			printf '%s\n' "$f"
		fi
	done | sort -V | tail -n 1
}

mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

# Newest already unpacked kernel for this flavour, for use without apt lists.
cached_kernel() {
	newest "$cache"/linux-image-*-"${meta#linux-image-}"/boot/vmlinuz-*
}

# The vmlinuz of an unpacked kernel dir that also has its modules, or nothing.
complete_kernel() {
	local k
	[ -s "$1/modules/order" ] || return 0
	for k in "$1"/boot/vmlinuz-*; do
		if [ -f "$k" ]; then
			printf '%s\n' "$k"
			return 0
		fi
	done
}

# Module names use '_' where file names may use '-' (virtio-rng.ko is virtio_rng).
modname() {
	local n=${1##*/}
	n=${n%%.ko*}
	printf '%s\n' "${n//-/_}"
}

# The modules a .ko file depends on, one per line.
module_deps() {
	local deps
	if command -v modinfo >/dev/null 2>&1; then
		deps=$(modinfo -F depends "$1") || die "modinfo $1 failed"
	else
		deps=$(tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n 1)
	fi
	tr ',' '\n' <<<"$deps" | sed '/^$/d'
}

# Copies the wanted modules and their dependencies from the unpacked package
# root $1 into $2 (flat NAME.ko files) and writes $2/order.
collect_modules() {
	local root=$1 out=$2 dir f n
	local -A file=() state=()
	local -a order=()
	dir=
	for f in "$root"/lib/modules/* "$root"/usr/lib/modules/*; do
		[ -d "$f/kernel" ] && dir=$f && break
	done
	[ -n "$dir" ] || die "the package has no lib/modules/<version>/kernel"
	while IFS= read -r -d '' f; do
		file[$(modname "$f")]=$f
	done < <(find "$dir" -name '*.ko' -print0 -o -name '*.ko.xz' -print0 -o -name '*.ko.zst' -print0)
	visit() {
		local m=$1 d
		[ "${state[$m]:-}" = done ] && return 0
		[ "${state[$m]:-}" = busy ] && die "module dependency cycle through $m"
		[ -n "${file[$m]:-}" ] || die "module $m is not in the package (built in? remove it from the list)"
		state[$m]=busy
		for d in $(module_deps "${file[$m]}"); do
			visit "$(modname "$d")"
		done
		state[$m]=done
		order+=("$m")
	}
	for n in $wanted; do
		visit "$(modname "$n")"
	done
	mkdir -p "$out"
	: >"$out/order"
	for n in "${order[@]}"; do
		f=${file[$n]}
		local base=${f##*/}
		case $f in
		*.ko.xz) base=${base%.xz}; xz -dc "$f" >"$out/$base" || die "cannot decompress $f" ;;
		*.ko.zst) base=${base%.zst}; zstd -qdc "$f" >"$out/$base" || die "cannot decompress $f" ;;
		*) cp "$f" "$out/$base" ;;
		esac
		printf '%s\n' "$base" >>"$out/order"
	done
}

# Unpacks boot/ and the modules of .deb $1 into the kernel dir $2.
unpack() {
	local deb=$1 dest=$2 tmp
	tmp=$(mktemp -d "$cache/.unpack.XXXXXX")
	# shellcheck disable=SC2064
	trap "rm -rf '$tmp'" EXIT
	dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb -x $deb failed"
	[ -d "$tmp/root/boot" ] || die "$deb has no boot/ directory"
	mkdir -p "$tmp/pkg"
	collect_modules "$tmp/root" "$tmp/pkg/modules"
	mv "$tmp/root/boot" "$tmp/pkg/boot"
	rm -rf "$dest"
	mv "$tmp/pkg" "$dest"
	rm -rf "$tmp"
	trap - EXIT
}

pkg=$(apt-cache depends "$meta" 2>/dev/null |
	awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }') || true

if [ -z "$pkg" ]; then
	k=$(cached_kernel)
	[ -n "$k" ] || die "cannot resolve $meta with apt-cache; run 'apt-get update' first"
	dest=$(dirname "$(dirname "$k")")
	if [ -z "$(complete_kernel "$dest")" ]; then
		deb=$(newest "$cache/${dest##*/}"_*.deb)
		[ -n "$deb" ] || die "cached $k has no modules/ and its .deb is gone; run 'apt-get update' first"
		echo "fetch-kernel: unpacking the modules of $deb" >&2
		unpack "$deb" "$dest"
		k=$(complete_kernel "$dest")
		[ -n "$k" ] || die "no vmlinuz in $deb"
	fi
	echo "fetch-kernel: cannot resolve $meta (no apt lists?), using cached $k" >&2
	echo "$k"
	exit 0
fi

dest=$cache/$pkg
k=$(complete_kernel "$dest")
if [ -n "$k" ]; then
	echo "$k"
	exit 0
fi

cd "$cache"
deb=$(newest "${pkg}"_*.deb)
if [ -z "$deb" ]; then
	# As root, apt drops to the _apt user for downloads unless told not to;
	# the cache dir may not be writable for _apt.
	sandbox=()
	[ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
	apt-get "${sandbox[@]}" -q download "$pkg" >&2 || die "apt-get download $pkg failed"
	deb=$(newest "${pkg}"_*.deb)
	[ -n "$deb" ] || die "apt-get download $pkg left no .deb in $cache"
fi

unpack "$cache/$deb" "$dest"
k=$(complete_kernel "$dest")
[ -n "$k" ] || die "no vmlinuz in $deb"
echo "$k"
