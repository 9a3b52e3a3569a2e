#!/usr/bin/env bash
# Build the isla guest kernel (vmlinux + bzImage) from Debian's linux-source-6.1 and the config
# fragment in guest/kernel/, caching the result under ~/.cache/isla/kernel/<hash of inputs>/.
# Prints the output directory on stdout. A cached build is reused at no cost.
#
# usage: build-kernel.sh [standard|nested]
#   standard  unpatched, for hardware KVM
#   nested    adds guest/kernel/nested/ (patches and nested.config) for nested PVM hosts
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
flavour=${1:-standard}
case "$flavour" in
  standard) fragments=("$here/kernel/isla-guest.config"); patches=() ;;
  nested) fragments=("$here/kernel/isla-guest.config" "$here/kernel/nested/nested.config")
          patches=("$here"/kernel/nested/*.patch) ;;
  *) echo "build-kernel: unknown flavour '$flavour' (standard or nested)" >&2; exit 2 ;;
esac
cache=${ISLA_CACHE:-$HOME/.cache/isla}
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "build-kernel: $src_tar missing: apt-get install linux-source-6.1" >&2; exit 1; }
src_ver=$(dpkg-query -W -f '${Version}' linux-source-6.1)
key=$( { echo "linux-source-6.1 $src_ver $flavour"; cat "${fragments[@]}" "$here/build-kernel.sh";
         [ ${#patches[@]} -eq 0 ] || cat "${patches[@]}"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  echo "$out"; exit 0
fi
work="$cache/build/linux-$key"
rm -rf "$work"; mkdir -p "$work"
echo "build-kernel: unpacking linux-source-6.1 $src_ver into $work" >&2
tar -C "$work" --strip-components=1 -xf "$src_tar"
cd "$work"
for p in "${patches[@]}"; do
  echo "build-kernel: applying $(basename "$p")" >&2
  patch -p1 --quiet --forward < "$p"
done
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "${fragments[@]}" >/dev/null
make -s olddefconfig >&2
# Every line of the fragment must have survived olddefconfig (a dropped one means a missing dependency).
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" .config || { echo "build-kernel: not applied: $line" >&2; missing=1; } ;;
    "# CONFIG_"*" is not set") opt=${line#"# "}; opt=${opt%" is not set"}
      grep -q "^$opt=" .config && { echo "build-kernel: still set: $opt" >&2; missing=1; } ;;
  esac
done < <(cat "${fragments[@]}")
[ "$missing" = 0 ] || { echo "build-kernel: the fragment does not apply cleanly" >&2; exit 1; }
echo "build-kernel: compiling the $flavour flavour (about 5 minutes on 2 cores)" >&2
make -s -j"$(nproc)" vmlinux bzImage >&2
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"; cp arch/x86/boot/bzImage "$out.tmp/bzImage"; cp .config "$out.tmp/config"
cp System.map "$out.tmp/System.map"
rm -rf "$out"; mv "$out.tmp" "$out"
cd /; rm -rf "$work"
echo "$out"
