#!/bin/sh
# isla lab: the script that runs INSIDE each kind (and on the host, for the baseline).
# It prints "LAB <what> <value>" lines that the lab reads back. POSIX sh (busybox or dash).
# Parameters (environment):
#   LAB_MODE     probe | work | idle    (idle: print "LAB idle" and wait)
#   LAB_TOKEN    a random word; LAB_HOSTPID: a host process whose command line holds it;
#   LAB_MARKER   a host file that holds it (the probes look for both)
#   LAB_DISK     fio's target (a file or a block device)   LAB_SIZE: fio's size (e.g. 64M)
#   LAB_SECONDS  how long each sysbench and fio run lasts
#   LAB_IP       if set, configure eth0 with this address (/24) before starting the servers
#   LAB_TOOLS    if set, a directory holding the tools' files (and LD_LIBRARY_PATH set for them)
export PATH="$LAB_TOOLS/usr/local/bin:$LAB_TOOLS/usr/bin:$LAB_TOOLS/bin:$PATH"
: "${LAB_SECONDS:=3}" "${LAB_SIZE:=64M}"
out=/tmp/lab.out
# busybox applets by name where the system has no such command (httpd on a Debian host).
bb() { if command -v "$1" > /dev/null 2>&1; then "$@"; else busybox "$@"; fi; }

probe() {
  echo "LAB probe kernel_release=$(uname -r)"
  read -r b < /proc/sys/kernel/random/boot_id
  echo "LAB probe boot_id=$b"
  read -r p1 < /proc/1/comm
  echo "LAB probe pid1=$p1"
  n=0
  for d in /proc/[0-9]*; do n=$((n + 1)); done
  echo "LAB probe processes=$n"
  seen=no
  if [ -r "/proc/$LAB_HOSTPID/cmdline" ]; then
    case "$(tr '\0' ' ' < "/proc/$LAB_HOSTPID/cmdline")" in *"$LAB_TOKEN"*) seen=yes ;; esac
  fi
  echo "LAB probe host_process_visible=$seen"
  ifs=
  for i in /sys/class/net/*; do
    [ -e "$i" ] || continue
    read -r mac < "$i/address"
    ifs="$ifs${i##*/}/$mac,"
  done
  echo "LAB probe interfaces=$ifs"
  m=
  [ -r "$LAB_MARKER" ] && read -r m < "$LAB_MARKER"
  if [ -n "$LAB_TOKEN" ] && [ "$m" = "$LAB_TOKEN" ]; then echo "LAB probe host_marker_visible=yes"; else echo "LAB probe host_marker_visible=no"; fi
  n=0
  for d in /dev/*; do n=$((n + 1)); done
  echo "LAB probe dev_entries=$n"
  if [ -e /dev/kvm ]; then echo "LAB probe dev_kvm=yes"; else echo "LAB probe dev_kvm=no"; fi
}

# Runs a tool once more if it fails (fresh processes crash now and then on nested hosts).
try() {
  "$@" > "$out" 2>&1 && return 0
  echo "LAB retry $1 (exit $?)"
  "$@" > "$out" 2>&1
}

work() {
  if try sysbench cpu --cpu-max-prime=10000 --threads=1 --time="$LAB_SECONDS" run; then
    echo "LAB cpu $(sed -n 's/.*events per second: *//p' "$out")"
  else
    echo "LAB error cpu sysbench failed: $(tail -n 2 "$out" | tr '\n' ' ')"
  fi
  for t in seqwrite:write:1M seqread:read:1M randread:randread:4k; do
    name=${t%%:*}; rest=${t#*:}; rw=${rest%%:*}; bs=${rest#*:}
    if try fio --name="$name" --rw="$rw" --bs="$bs" --size="$LAB_SIZE" --filename="$LAB_DISK" \
        --ioengine=psync --direct=1 --runtime="$LAB_SECONDS" --time_based \
        --output-format=terse --terse-version=3; then
      read -r line < "$out"
      echo "LAB fio-$name $line"
    else
      echo "LAB error fio-$name fio failed: $(tail -n 2 "$out" | tr '\n' ' ')"
    fi
  done
}

serve() {
  ip link set lo up 2>/dev/null
  if [ -n "$LAB_IP" ]; then
    ip addr add "$LAB_IP/24" dev eth0 && ip link set eth0 up || echo "LAB error net eth0 set-up failed"
  fi
  mkdir -p /tmp/www
  echo "isla lab: hello from inside" > /tmp/www/index.html
  bb httpd -p 8080 -h /tmp/www || echo "LAB error http busybox httpd did not start"
  iperf3 -s -D -p 5201 > /dev/null 2>&1 || echo "LAB error net iperf3 -s did not start"
  sleep 1
  echo "LAB ready"
}

case "$LAB_MODE" in
  probe) probe ;;
  work) probe; work; serve ;;
  idle) ;;
esac
echo "LAB idle"
while :; do sleep 3600; done
