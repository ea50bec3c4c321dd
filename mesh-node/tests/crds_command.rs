//! `mesh-node crds` writes a CRD to standard output; a reader that stops early (`| head`)
//! ends it quietly with success, never with a panic.

use std::{io::Read, process::Command, process::Stdio};

#[test]
fn a_reader_that_stops_early_ends_crds_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-node"))
        .args(["crds", "--kind", "destination-rule"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read a little (the CRD is larger than a pipe's buffer), then hang up.
    let mut head = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(head.starts_with(b"apiVersion"), "{head:?}");
}
