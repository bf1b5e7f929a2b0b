#!/usr/bin/env bash
# Build the hospes default guest from Debian packages only:
#   vmlinuz            Debian's newest 6.1 cloud kernel (bzImage, unsigned package)
#   initramfs.cpio.gz  busybox-static + virtio modules + resources/guest/init
#   KERNEL_VERSION     e.g. 6.1.0-56-cloud-amd64
#   modules/<kver>/    the package's whole module tree (the test rig's L2 runs the
#                      same kernel and loads kvm, virtio_pci, tun, bridge... from it)
#   busybox            the static busybox binary (also used by the rig)
# into ${HOSPES_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hospes/guest}, and prints that
# directory as the last line of stdout. A finished build is reused while its stamp
# (hash of this script + init, kernel version) still matches. The build happens in a
# temporary directory renamed into place, so an interrupted build never looks complete.
#
# Needs apt-get (download only); installs cpio with apt-get when missing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${HOSPES_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hospes/guest}
parent=$(dirname "$out")
mkdir -p "$parent"

log() { echo "guest/build.sh: $*" >&2; }

# The virtio stack the default guest loads, in any order (dependencies are resolved
# from each module's own "depends=" modinfo field).
guest_modules=(virtio virtio_ring virtio_mmio virtio_blk failover net_failover virtio_net)

# One build at a time (several test binaries may call us at once).
exec 9>"$parent/.$(basename "$out").lock"
flock 9

kernel_pattern='^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$'
newest_kernel_pkg() {
	apt-cache search --names-only "$kernel_pattern" 2>/dev/null | cut -d' ' -f1 | sort -V | tail -n1
}

pkg=$(newest_kernel_pkg)
if [[ -z $pkg ]]; then
	if [[ -f $out/stamp ]]; then
		log "no kernel package in the apt lists; reusing $out"
		echo "$out"
		exit 0
	fi
	log "no $kernel_pattern in the apt lists: running apt-get update"
	apt-get update -qq >&2
	pkg=$(newest_kernel_pkg)
	[[ -n $pkg ]] || { log "no package matches $kernel_pattern"; exit 1; }
fi
kver=${pkg#linux-image-}
kver=${kver%-unsigned}

stamp="$(cat "$here/build.sh" "$here/init" | sha256sum | cut -d' ' -f1) $kver"
if [[ -f $out/stamp && $(cat "$out/stamp") == "$stamp" ]]; then
	echo "$out"
	exit 0
fi

if ! command -v cpio >/dev/null; then
	log "installing cpio"
	apt-get install -y -qq cpio >&2
fi

log "building the default guest ($kver) in $out"
tmp=$(mktemp -d "$parent/.build.XXXXXX")
chmod 0755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
(
	cd "$tmp"
	# apt-get download as root warns that _apt cannot write here; harmless.
	apt-get download -qq "$pkg" busybox-static 2> >(grep -v 'unsandboxed as root' >&2)
	mkdir -p pkg
	for deb in ./*.deb; do dpkg-deb -x "$deb" pkg; done
	rm -f ./*.deb
)
pkgroot=$tmp/pkg
[[ -f $pkgroot/boot/vmlinuz-$kver ]] || { log "package $pkg has no boot/vmlinuz-$kver"; exit 1; }
cp "$pkgroot/boot/vmlinuz-$kver" "$tmp/vmlinuz"
cp "$pkgroot/bin/busybox" "$tmp/busybox"
mkdir -p "$tmp/modules"
mv "$pkgroot/lib/modules/$kver" "$tmp/modules/$kver"
cp "$pkgroot/boot/config-$kver" "$tmp/modules/$kver/config"
moddir=$tmp/modules/$kver

# Path of a module's .ko by module name (file names may use '-' where names use '_').
ko_path() {
	find "$moddir/kernel" \( -name "$1.ko" -o -name "${1//_/-}.ko" \) -print -quit
}
# Module names a .ko depends on (from its .modinfo section; the package has no modules.dep).
ko_depends() {
	tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | tr ',' ' '
}
# Depth-first: dependencies before dependents, each once.
ordered=()
declare -A seen=()
visit() {
	local name=$1 ko dep
	[[ -n ${seen[$name]:-} ]] && return
	seen[$name]=1
	ko=$(ko_path "$name")
	if [[ -z $ko ]]; then
		if grep -q "/${name//_/[-_]}\.ko$" "$moddir/modules.builtin"; then return; fi
		log "module $name not found in $pkg"
		exit 1
	fi
	for dep in $(ko_depends "$ko"); do visit "$dep"; done
	ordered+=("$ko")
}
for m in "${guest_modules[@]}"; do visit "$m"; done

root=$tmp/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc,lib/modules}
cp "$tmp/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
	[[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
done
install -m 0755 "$here/init" "$root/init"
: >"$root/etc/modules"
for ko in "${ordered[@]}"; do
	cp "$ko" "$root/lib/modules/"
	basename "$ko" >>"$root/etc/modules"
done
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
echo "hospes-guest" >"$root/etc/hostname"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) |
	gzip -9 >"$tmp/initramfs.cpio.gz"
rm -rf "$root" "$pkgroot"
echo "$kver" >"$tmp/KERNEL_VERSION"
echo "$stamp" >"$tmp/stamp"

# Swap the finished build in; the old one (if any) goes away afterwards.
old=
if [[ -e $out ]]; then
	old=$(mktemp -d "$parent/.old.XXXXXX")
	mv "$out" "$old/"
fi
mv "$tmp" "$out"
trap - EXIT
[[ -n $old ]] && rm -rf "$old"
log "done: $(du -sh "$out/initramfs.cpio.gz" | cut -f1) initramfs, kernel $kver"
echo "$out"
