//! What is wrong with, or left out of, a configuration object (a DestinationRule and
//! its parts): the field, a typed reason (the `reason` label of
//! `nodemesh_config_problems_total`) and what to do. The compilers of each part report
//! these; `discovery::problems` logs and counts them.

use serde::{Deserialize, Serialize};

/// Why part or all of a rule is not applied: the `reason` label of
/// `nodemesh_config_problems_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemReason {
    BadHost,
    BadDuration,
    UnknownValue,
    BadValue,
    DuplicateSubset,
    TooLarge,
    /// Another rule for the same host is older (or sorts first): this one is not used.
    Shadowed,
    /// Reported, not applied; the rest of the rule applies.
    NotImplemented,
    /// A field that cannot be applied as written is left out (reported); the rest of
    /// the rule applies (consistentHash).
    InvalidField,
    /// A value above what Nodemesh allows is capped (reported); the rest applies.
    Capped,
    /// Fields that may not be set together are (Istio rejects the object): Nodemesh
    /// reads them the safe way (reported; the policy applies to the pods of both).
    ExclusiveFields,
}

impl ProblemReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemReason::BadHost => "bad_host",
            ProblemReason::BadDuration => "bad_duration",
            ProblemReason::UnknownValue => "unknown_value",
            ProblemReason::BadValue => "bad_value",
            ProblemReason::DuplicateSubset => "duplicate_subset",
            ProblemReason::TooLarge => "too_large",
            ProblemReason::Shadowed => "shadowed",
            ProblemReason::NotImplemented => "not_implemented",
            ProblemReason::InvalidField => "invalid_field",
            ProblemReason::Capped => "capped",
            ProblemReason::ExclusiveFields => "exclusive_fields",
        }
    }

    /// Whether the rule is rejected whole (otherwise only the field is left out).
    pub fn rejects(self) -> bool {
        !matches!(
            self,
            ProblemReason::NotImplemented
                | ProblemReason::Shadowed
                | ProblemReason::InvalidField
                | ProblemReason::Capped
                | ProblemReason::ExclusiveFields
        )
    }
}

/// One thing wrong with, or left out of, a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Problem {
    /// Where in the spec, e.g. `trafficPolicy.outlierDetection.interval`.
    pub field: String,
    pub reason: ProblemReason,
    /// What is wrong and what to do.
    pub detail: String,
}

impl Problem {
    /// `field` is present but Nodemesh does not implement `what`: reported, not
    /// applied; the rest of the rule applies.
    pub fn not_implemented(field: String, what: &str) -> Problem {
        Problem {
            field,
            reason: ProblemReason::NotImplemented,
            detail: format!("{what} is not implemented by Nodemesh yet: it is not applied"),
        }
    }
}
