#!/usr/bin/env bash
# Build the whole guest kit (kernel in its standard and nested flavours, initramfs, ext4 rootfs),
# reusing cached pieces, and write
# ~/.cache/isla/guest-kit.env naming them. Tests and `isla` read that file to find the kit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${ISLA_CACHE:-$HOME/.cache/isla}
kernel=$("$here/build-kernel.sh" standard)
nested=$("$here/build-kernel.sh" nested)
# The in-guest agent: a static binary (glibc's static libc; no musl target on these machines).
( cd "$here/.." && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
    cargo build -q --release --locked -p isla-agent --bin isla-agent --target x86_64-unknown-linux-gnu ) >&2
rootfs=$("$here/build-initramfs.sh" "$here/../target/x86_64-unknown-linux-gnu/release/isla-agent")
mkdir -p "$cache"
cat > "$cache/guest-kit.env.tmp" <<ENV
ISLA_KERNEL_VMLINUX=$kernel/vmlinux
ISLA_KERNEL_BZIMAGE=$kernel/bzImage
ISLA_KERNEL_NESTED_VMLINUX=$nested/vmlinux
ISLA_KERNEL_NESTED_BZIMAGE=$nested/bzImage
ISLA_INITRAMFS=$rootfs/initramfs.cpio
ISLA_ROOTFS=$rootfs/rootfs.ext4
ENV
mv "$cache/guest-kit.env.tmp" "$cache/guest-kit.env"
cat "$cache/guest-kit.env"
