//! HTTPRoute rules: compiled route tables, request matching, and filters.

pub mod filters;
pub(crate) mod matching;
pub mod routes;
