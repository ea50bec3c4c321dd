# The test run inside the VM, on the payload disk (/payload, read-only). `cargo xtask`
# puts the settings above this line: NM_TESTS (name:path pairs), NM_TIME_SCALE,
# NM_TEST_THREADS, NM_TEST_TIMEOUT, NM_PROBE_TIMEOUT and the test filter as "$@".
# Everything goes to the second serial port, which the host reads; lines starting with
# NODEMESH-VM are for the host's runner.
exec >/dev/ttyS1 2>&1
say() { echo "NODEMESH-VM $*"; }
say "booted kernel=$(uname -r)"

# What the simulated cluster needs, as a node's init system would provide it.
mountpoint -q /run || mount -t tmpfs -o mode=755 tmpfs /run
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /sys/fs/bpf
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/netns
ip link set lo up
ulimit -n 65536
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 NO_COLOR=1 NODEMESH_TIME_SCALE="$NM_TIME_SCALE"
release=/payload/release
say "uname $(uname -srvm)"
say "cgroup2 $(stat -fc %T /sys/fs/cgroup), bpffs $(stat -fc %T /sys/fs/bpf), BTF $([ -r /sys/kernel/btf/vmlinux ] && echo present || echo absent), cpus $(nproc), time scale $NM_TIME_SCALE"

# The agent's start on this kernel: every eBPF program loads and attaches, or the
# agent names the kernel feature that is missing.
probe() {
    dir=/tmp/nm-probe
    mkdir -p "$dir/manifests" /sys/fs/cgroup/nm-probe
    "$release/mesh-node" agent --node-name vm-probe --manifests "$dir/manifests" \
        --netns-locator netns-dir --cgroup-root /sys/fs/cgroup/nm-probe \
        --pin-dir /sys/fs/bpf/nm-probe >"$dir/log" 2>&1 &
    pid=$!
    waited=0
    while [ "$waited" -lt "$NM_PROBE_TIMEOUT" ]; do
        if grep -q "agent ready" "$dir/log" || ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 1
        waited=$((waited + 1))
    done
    if grep -q "agent ready" "$dir/log"; then
        say "agent-probe ok after ${waited}s"
    else
        say "agent-probe FAILED after ${waited}s"
    fi
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    sed 's/^/agent-probe| /' "$dir/log"
    rm -rf /sys/fs/bpf/nm-probe
    rmdir /sys/fs/cgroup/nm-probe 2>/dev/null
}
probe

rc=0
for entry in $NM_TESTS; do
    name=${entry%%:*}
    path=/payload/${entry#*:}
    say "test-binary $name start"
    started=$(date +%s)
    timeout -k 10 "$NM_TEST_TIMEOUT" "$path" --color never --test-threads="$NM_TEST_THREADS" "$@"
    code=$?
    say "test-binary $name exit=$code seconds=$(($(date +%s) - started))"
    [ "$code" -eq 0 ] || rc=1
    "$release/mesh-sim" sweep
done
left=$(ip netns list | grep -c '^nm')
say "netns-left $left"
say "done rc=$rc"
