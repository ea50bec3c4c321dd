# The Nodemesh image: `mesh-node` (agent and CA), `meshctl`, and the eBPF object next
# to mesh-node, where the agent looks for it by default.
#   docker build -t nodemesh/mesh-node:0.1.0 .
# Stages: the eBPF object (nightly + bpf-linker), the binaries (stable), a small runtime.
# A test (mesh-node/tests/dockerfile.rs) checks the paths and names used here against the
# workspace and `cargo xtask build`.

# --- eBPF programs: nightly with rust-src (build-std) and the bpf-linker that matches
# its LLVM, exactly as `cargo xtask build` does. The nightly is pinned: a newer one may
# ship an LLVM this bpf-linker cannot drive.
FROM rust:1.95-bookworm AS ebpf
ARG NIGHTLY=nightly-2026-05-19
ARG BPF_LINKER_VERSION=0.10.0
RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && cargo install "bpf-linker@$BPF_LINKER_VERSION" --locked
WORKDIR /src
# mesh-common inherits its edition, version and lints from the root manifest, so cargo
# reads it (the other members need not be present: mesh-ebpf is a workspace of its own).
COPY Cargo.toml ./
COPY mesh-common mesh-common
COPY mesh-ebpf mesh-ebpf
RUN cd mesh-ebpf \
 && RUSTFLAGS="-C debuginfo=2 -C link-arg=--btf" cargo +"$NIGHTLY" build --release \
      --target bpfel-unknown-none -Z build-std=core --target-dir /src/target/ebpf

# --- The agent and meshctl (stable). Every workspace member must be present for cargo
# to read the workspace; only mesh-node's binaries are built.
FROM rust:1.95-bookworm AS agent
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY mesh-common mesh-common
COPY mesh-node mesh-node
COPY xtask xtask
COPY tests tests
RUN cargo build --release --locked -p mesh-node --bins

# --- Runtime: glibc (the binaries link it dynamically) and nothing else we need.
FROM debian:bookworm-slim
COPY --from=agent /src/target/release/mesh-node /usr/local/bin/mesh-node
COPY --from=agent /src/target/release/meshctl /usr/local/bin/meshctl
COPY --from=ebpf /src/target/ebpf/bpfel-unknown-none/release/mesh-ebpf /usr/local/bin/mesh-ebpf.o
ENTRYPOINT ["/usr/local/bin/mesh-node"]
