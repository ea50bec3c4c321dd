//! The README's demo command runs end to end and shows what it promises.

use mesh_tests::sim::host::target_bin;

#[test]
fn the_demo_shows_redirection_mtls_identities_the_split_and_cleans_up() {
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
        "the client's socket was connected to 127.0.0.1:15001",
        "security mutual_tls: spiffe://cluster.local/ns/apps/sa/client -> spiffe://cluster.local/ns/apps/sa/server",
        "web-v1 got 900, web-v2 got 100",
        "node b captured it on 15006",
        "probe ok=true",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}
