//! HTTP route rules — HTTPRoute's and VirtualService's, one engine: compiled route
//! tables, request matching, and filters.

pub mod fault;
pub mod filters;
pub(crate) mod matching;
pub mod routes;
pub mod rule;
pub(crate) mod virtual_service;
