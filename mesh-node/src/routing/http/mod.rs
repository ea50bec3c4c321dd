//! HTTPRoute rules: compiled route tables, request matching, and filters.

pub mod filters;
pub mod matching;
pub mod routes;
