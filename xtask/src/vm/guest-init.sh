#!/bin/sh
# PID 1 of the test VM (baked into the cached image): mounts the payload disk that
# `cargo xtask` made for this run, runs its script, and powers the VM off whatever
# happens, so qemu exits.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /payload
if mount -o ro /dev/vdb /payload && [ -r /payload/run.sh ]; then
    /bin/sh /payload/run.sh
else
    echo "NODEMESH-VM failed: no payload disk at /dev/vdb" >/dev/ttyS1
fi
sync
echo o >/proc/sysrq-trigger
sleep 60
