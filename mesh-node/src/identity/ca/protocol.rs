//! The CA's wire format: JSON over HTTPS.

use serde::{Deserialize, Serialize};

pub(crate) const SIGN_PATH: &str = "/v1/sign";

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SignRequest {
    /// The SPIFFE ID wanted; the CSR's only SAN must be exactly this.
    pub identity: String,
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignResponse {
    /// The workload certificate (PEM).
    pub certificate: String,
    /// The root that signed it (PEM), for peers' verification.
    pub root: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorResponse {
    pub error: String,
}
