#!/usr/bin/env bash
# Build the guest-kit root tree (busybox-static, the init in guest/rootfs/) and pack it as an
# uncompressed newc initramfs (without applet symlinks) (the kernel unpacks it without a decompressor) and as an ext4 image
# (mkfs.ext4 -d), with the in-guest agent (static binary given as $1, installed as /sbin/isla-agent).
# Cached under ~/.cache/isla/rootfs/<hash of inputs>/; prints that directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${ISLA_CACHE:-$HOME/.cache/isla}
busybox=/bin/busybox
[ -x "$busybox" ] && file -L "$busybox" | grep -q "statically linked" ||
  { echo "build-initramfs: a static $busybox is needed: apt-get install busybox-static" >&2; exit 1; }
agent=${1:?usage: build-initramfs.sh PATH-TO-STATIC-isla-agent}
file -L "$agent" | grep -q "static" || { echo "build-initramfs: $agent is not a static binary" >&2; exit 1; }
command -v gcc >/dev/null || { echo "build-initramfs: gcc is needed for /init: apt-get install gcc" >&2; exit 1; }
key=$( { sha256sum "$busybox" "$agent" | cut -d' ' -f1; cat "$here/build-initramfs.sh" "$here/init/marker-init.c";
         gcc --version | head -n 1; (cd "$here/rootfs" && find . -type f -print0 | sort -z | xargs -0 sha256sum); } |
       sha256sum | cut -c1-16)
out="$cache/rootfs/$key"
if [ -f "$out/initramfs.cpio" ] && [ -f "$out/rootfs.ext4" ]; then echo "$out"; exit 0; fi
tree=$(mktemp -d); trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc/isla/checks,mnt,run,var}
cp "$busybox" "$tree/bin/busybox"
cp "$agent" "$tree/sbin/isla-agent"
for applet in $("$busybox" --list-full); do
  [ -e "$tree/$applet" ] || ln -s /bin/busybox "$tree/$applet"
done
cp -a "$here/rootfs/." "$tree/"
# /init writes the boot-time marker and runs the kit's init script, /etc/isla/init (see the C file).
gcc -Os -static -nostdlib -ffreestanding -fno-stack-protector -fno-asynchronous-unwind-tables -no-pie -s \
  -Wall -Wextra -Werror -o "$tree/init" "$here/init/marker-init.c"
# Booted from the ext4 image the kernel runs /sbin/init (/init is the initramfs's): the kit's init,
# not busybox's.
ln -sfn /init "$tree/sbin/init"
chmod 1777 "$tree/tmp"
echo "root:x:0:0:root:/root:/bin/sh" > "$tree/etc/passwd"
echo "root:x:0:" > "$tree/etc/group"
# The kernel opens /dev/console before init mounts devtmpfs: the node must be in the archive.
mknod -m 600 "$tree/dev/console" c 5 1 || { echo "build-initramfs: mknod needs root" >&2; exit 1; }
mkdir -p "$out.tmp"
# The initramfs leaves out the ~400 applet symlinks (busybox's shell runs applets by name without
# them): each file costs the kernel time to unpack, and that time is seconds where it is emulated.
(cd "$tree" && { find . -mindepth 1 \( -path ./bin/sh -o ! -lname /bin/busybox \) | sort; } |
  cpio --quiet -o -H newc -R 0:0 > "$out.tmp/initramfs.cpio")
mkfs.ext4 -q -F -L isla-root -d "$tree" "$out.tmp/rootfs.ext4" 64M >&2
rm -rf "$out"; mv "$out.tmp" "$out"
echo "$out"
