//! The README's demo command runs the example app of deploy/examples/ end to end and
//! shows what it promises: the 90/10 split, mTLS identities, the denial, meshctl.

use mesh_tests::sim::host::target_bin;

#[test]
fn the_demo_shows_the_split_identities_the_denial_and_meshctl() {
    let out = std::process::Command::new(target_bin("mesh-sim").unwrap())
        .arg("demo")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "pod web-v2     ns demo  sa web        node b",
        " failed, median latency",
        "(90.0 %)",
        "(10.0 %)",
        "mutual_tls spiffe://cluster.local/ns/demo/sa/client -> spiffe://cluster.local/ns/demo/sa/web",
        "HTTP 403: RBAC: access denied",
        "node b denied GET / from spiffe://cluster.local/ns/demo/sa/forbidden: ALLOW policies select this workload and none matched (flag RBAC)",
        "node b denied DELETE / from spiffe://cluster.local/ns/demo/sa/client",
        "==> meshctl node workloads, on node b",
        "Done: tearing the cluster down",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    assert!(text.contains(" 0 failed,"), "requests failed:\n{text}");
}
