#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need from Debian
# when missing, checks formatting and lints, then runs every test. End-to-end tests boot
# real guests on real KVM inside the nested rig (see rig/).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v iasl >/dev/null || need+=(acpica-tools)
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx mke2fs || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
	echo "test.sh: installing ${need[*]} from Debian" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

resources/guest/build.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
