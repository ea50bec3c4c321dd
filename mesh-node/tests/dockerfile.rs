//! The Dockerfile cannot be built here (no container engine), so this checks what can
//! be checked: every path it copies exists, every binary it takes is one the workspace
//! builds, the eBPF build is the one `cargo xtask build` runs, and the object lands
//! where the agent looks for it by default.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One instruction, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

struct Copy {
    stage: String,
    from: Option<String>,
    sources: Vec<String>,
    destination: String,
}

struct Dockerfile {
    stages: Vec<String>,
    copies: Vec<Copy>,
    args: BTreeMap<String, String>,
    runs: Vec<String>,
    entrypoint: String,
}

fn parse() -> Dockerfile {
    let mut d = Dockerfile {
        stages: Vec::new(),
        copies: Vec::new(),
        args: BTreeMap::new(),
        runs: Vec::new(),
        entrypoint: String::new(),
    };
    let mut stage = String::new();
    for ins in instructions(&read("Dockerfile")) {
        let words: Vec<&str> = ins.split_whitespace().collect();
        match words[0] {
            "FROM" => {
                stage = match words.iter().position(|w| w.eq_ignore_ascii_case("AS")) {
                    Some(i) => words[i + 1].to_string(),
                    None => "runtime".into(),
                };
                d.stages.push(stage.clone());
            }
            "COPY" => {
                let (from, rest) = match words[1].strip_prefix("--from=") {
                    Some(f) => (Some(f.to_string()), &words[2..]),
                    None => (None, &words[1..]),
                };
                let (destination, sources) = rest.split_last().unwrap();
                d.copies.push(Copy {
                    stage: stage.clone(),
                    from,
                    sources: sources.iter().map(|s| s.to_string()).collect(),
                    destination: destination.to_string(),
                });
            }
            "ARG" => {
                let (k, v) = words[1].split_once('=').unwrap_or((words[1], ""));
                d.args.insert(k.into(), v.into());
            }
            "RUN" => d.runs.push(ins.clone()),
            "ENTRYPOINT" => {
                let list: Vec<String> = serde_json::from_str(ins["ENTRYPOINT".len()..].trim())
                    .expect("ENTRYPOINT in exec form");
                d.entrypoint = list[0].clone();
            }
            _ => {}
        }
    }
    d
}

/// Names of the `[[bin]]` targets of a package manifest.
fn binaries(manifest: &str) -> Vec<String> {
    toml_like::parse(&read(manifest)).bins
}

/// The few facts of a Cargo.toml this test needs, read line by line.
mod toml_like {
    pub struct Manifest {
        pub bins: Vec<String>,
        pub members: Vec<String>,
        pub path_dependencies: Vec<String>,
        pub version: Option<String>,
    }

    pub fn parse(text: &str) -> Manifest {
        let mut m = Manifest {
            bins: Vec::new(),
            members: Vec::new(),
            path_dependencies: Vec::new(),
            version: None,
        };
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line.to_string();
                continue;
            }
            let quoted = |s: &str| -> Vec<String> {
                s.split('"').skip(1).step_by(2).map(String::from).collect()
            };
            if section == "[[bin]]" && line.starts_with("name") {
                m.bins.extend(quoted(line));
            }
            if section == "[workspace]" && line.starts_with("members") {
                m.members.extend(quoted(line));
            }
            if section == "[workspace.package]" && line.starts_with("version") {
                m.version = quoted(line).into_iter().next();
            }
            if section == "[dependencies]" {
                if let Some(i) = line.find("path = \"") {
                    let rest = &line[i + 8..];
                    m.path_dependencies
                        .push(rest[..rest.find('"').unwrap()].to_string());
                }
            }
        }
        m
    }
}

#[test]
fn every_copied_workspace_path_exists_and_cargo_gets_what_it_reads() {
    let d = parse();
    for copy in d.copies.iter().filter(|c| c.from.is_none()) {
        for source in &copy.sources {
            assert!(
                root().join(source).exists(),
                "COPY {source}: not in the workspace"
            );
        }
    }
    let copied = |stage: &str| -> Vec<String> {
        d.copies
            .iter()
            .filter(|c| c.stage == stage && c.from.is_none())
            .flat_map(|c| c.sources.clone())
            .collect()
    };
    // The agent stage builds inside the workspace: cargo reads every member.
    let workspace = toml_like::parse(&read("Cargo.toml"));
    let agent = copied("agent");
    for needed in workspace
        .members
        .iter()
        .chain(&["Cargo.toml".into(), "Cargo.lock".into()])
    {
        assert!(
            agent.contains(needed),
            "the agent stage does not copy {needed}"
        );
    }
    // The eBPF crate is its own workspace; it needs its path dependencies.
    let ebpf = copied("ebpf");
    assert!(ebpf.contains(&"mesh-ebpf".to_string()));
    for dep in toml_like::parse(&read("mesh-ebpf/Cargo.toml")).path_dependencies {
        let dep = dep.trim_start_matches("../").to_string();
        assert!(ebpf.contains(&dep), "the ebpf stage does not copy {dep}");
        // A dependency that inherits fields from the workspace (`edition.workspace =
        // true`, `[lints] workspace = true`) makes cargo read the root manifest.
        let inherits = read(&format!("{dep}/Cargo.toml"))
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").replace(' ', ""))
            .any(|l| l.contains(".workspace=true") || l == "workspace=true");
        if inherits {
            assert!(
                ebpf.contains(&"Cargo.toml".to_string()),
                "{dep} inherits from the workspace: the ebpf stage must copy the root Cargo.toml"
            );
        }
    }
}

#[test]
fn the_image_holds_the_workspace_binaries_and_the_object_where_the_agent_looks() {
    let d = parse();
    let bins = binaries("mesh-node/Cargo.toml");
    let xtask = read("xtask/src/main.rs");
    let mut destinations = BTreeMap::new();
    for copy in d.copies.iter().filter(|c| c.from.is_some()) {
        let from = copy.from.as_deref().unwrap();
        assert!(
            d.stages.iter().any(|s| s == from),
            "COPY --from={from}: no such stage"
        );
        assert_eq!(copy.sources.len(), 1);
        let source = &copy.sources[0];
        let name = Path::new(source).file_name().unwrap().to_str().unwrap();
        match from {
            "agent" => {
                assert!(source.starts_with("/src/target/release/"), "{source}");
                assert!(
                    bins.iter().any(|b| b == name),
                    "{name} is not a mesh-node binary"
                );
            }
            "ebpf" => assert!(
                xtask.contains(source.trim_start_matches("/src/")),
                "{source} is not where the eBPF build puts the object"
            ),
            other => panic!("unexpected stage {other}"),
        }
        destinations.insert(name.to_string(), PathBuf::from(&copy.destination));
    }
    for bin in &bins {
        assert!(destinations.contains_key(bin), "the image lacks {bin}");
    }
    // The agent's default --ebpf-object: `mesh-ebpf.o` beside its executable.
    let agent = read("mesh-node/src/agent/mod.rs");
    assert!(agent.contains("with_file_name(\"mesh-ebpf.o\")"));
    let node = &destinations["mesh-node"];
    assert_eq!(
        destinations["mesh-ebpf"],
        node.with_file_name("mesh-ebpf.o")
    );
    assert_eq!(Path::new(&d.entrypoint), node.as_path());
}

#[test]
fn the_ebpf_build_is_the_one_xtask_runs() {
    let d = parse();
    let xtask = read("xtask/src/main.rs");
    let linker = &d.args["BPF_LINKER_VERSION"];
    assert!(
        xtask.contains(&format!("BPF_LINKER_VERSION: &str = \"{linker}\"")),
        "bpf-linker {linker} differs from xtask's"
    );
    let build = d
        .runs
        .iter()
        .find(|r| r.contains("bpfel-unknown-none"))
        .unwrap();
    for flag in [
        "-C debuginfo=2 -C link-arg=--btf",
        "bpfel-unknown-none",
        "build-std=core",
        "--release",
    ] {
        assert!(build.contains(flag) && xtask.contains(flag), "{flag}");
    }
    assert!(
        d.args["NIGHTLY"].starts_with("nightly-"),
        "pin the nightly by date"
    );
}

#[test]
fn the_manifests_run_the_image_of_this_version() {
    let version = toml_like::parse(&read("Cargo.toml")).version.unwrap();
    let image = format!("nodemesh/mesh-node:{version}");
    assert!(read("Dockerfile").contains(&format!("docker build -t {image} .")));
    for manifest in ["deploy/daemonset.yaml", "deploy/ca.yaml"] {
        assert!(
            read(manifest).contains(&format!("image: {image}")),
            "{manifest}"
        );
    }
    assert!(read("deploy/kustomization.yaml").contains(&format!("newTag: \"{version}\"")));
}
