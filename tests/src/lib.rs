//! The Nodemesh simulated cluster, shared by the end-to-end tests, the demo and the
//! benchmarks, and the report types of its test app.

pub mod bench;
pub mod collector;
pub mod conn_flood;
pub mod demo;
pub mod flood;
pub mod h2_client;
pub mod httpapp;
pub mod report;
pub mod sim;
pub mod upgrade_load;
