//! HTTPRoute rules: compiled route tables, request matching, and filters.

pub(crate) mod filters;
pub(crate) mod matching;
pub(crate) mod routes;
