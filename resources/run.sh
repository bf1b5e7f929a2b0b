#!/usr/bin/env bash
# Boots a service spec with hospes: directly on a host with hardware virtualization, or,
# on a host whose /dev/kvm cannot run stock kernels (no vmx/svm, e.g. PVM), inside the
# nested KVM rig: an L2 Linux under QEMU TCG whose own KVM gives a real /dev/kvm.
#
#   resources/run.sh resources/services/hello.toml
#
# Builds hospes (release) and the default guest first; both are cached.
set -euo pipefail
spec=${1:?usage: resources/run.sh SPEC.toml}
[ -f "$spec" ] || { echo "run.sh: no spec file $spec" >&2; exit 2; }
spec=$(realpath "$spec")
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

command -v cargo >/dev/null || { echo "run.sh: cargo is needed (a Rust toolchain)" >&2; exit 1; }
cargo build --release --quiet -p hospes -p rig
guest=$(resources/guest/build.sh | tail -n 1)
target/release/hospes check "$spec" >/dev/null

if grep -qwE 'vmx|svm' /proc/cpuinfo; then
	exec env HOSPES_GUEST_DIR="$guest" target/release/hospes run "$spec"
fi

echo "run.sh: this host has no hardware virtualization, so hospes runs inside the nested KVM rig" \
	"(an L2 Linux under QEMU TCG with a real /dev/kvm); the L2 boot adds a few seconds." >&2
# The spec's directory goes along, so paths relative to the spec resolve in L2 too.
args=()
for f in "$(dirname "$spec")"/*; do
	[ -f "$f" ] && args+=(--file "$f:/work/spec/$(basename "$f")")
done
exec target/release/rig exec \
	--bin target/release/hospes:/usr/local/bin/hospes \
	--file "$guest/vmlinuz:/guest/vmlinuz" \
	--file "$guest/initramfs.cpio.gz:/guest/initramfs.cpio.gz" \
	"${args[@]}" \
	-- "HOSPES_GUEST_DIR=/guest hospes run /work/spec/$(basename "$spec")"
