//! Hostile pods and faults, end to end on the simulated cluster: each test is an attack
//! from a pod (enrolled or not, unprivileged) or an operator's fault, and asserts what a
//! user needs: the agent stays within bounds, legitimate traffic keeps working, nothing
//! bypasses the mesh, and the refusal is counted under its own reason.
//!
//! One module per attack surface.
mod identity;
mod l7_requests;
mod listeners;
mod log_flood;
mod map_fill;
mod node_origin;
mod self_loop;
