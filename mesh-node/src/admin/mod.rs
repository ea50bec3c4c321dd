//! The operator's side of the agent: the admin API (localhost), its views, the health
//! gauges read at scrape time, the trace of where a connection would go, and the client
//! `meshctl` uses.

pub mod api;
pub mod client;
pub(crate) mod health;
pub(crate) mod peer_auth;
pub mod routes;
pub(crate) mod server;
pub mod state;
pub(crate) mod trace;
pub(crate) mod views;
pub mod virtual_services;
