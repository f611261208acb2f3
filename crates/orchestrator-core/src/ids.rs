//! Identifiers of the coordination domain: replica sets, workers, generations, epochs.

use std::fmt;

use thiserror::Error;

use crate::quote::quote;

/// A name or identifier given by the user was rejected. The message quotes a long value briefly
/// (its first characters and its length, see [`quote`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {what} {}: {rule}", quote(.value))]
pub struct InvalidName {
    /// Which kind of name was checked (`replica set name`, `worker id`, ...).
    pub what: &'static str,
    /// The rejected value, whole.
    pub value: String,
    /// The rule it broke.
    pub rule: String,
}

fn check_name(
    what: &'static str,
    value: &str,
    max_len: usize,
    allowed: fn(char) -> bool,
    rule: &'static str,
) -> Result<(), InvalidName> {
    let fail = |rule: String| InvalidName { what, value: value.to_owned(), rule };
    if value.is_empty() {
        return Err(fail("must not be empty".to_owned()));
    }
    if value.len() > max_len {
        return Err(fail(format!("must be at most {max_len} bytes")));
    }
    if !value.chars().all(allowed) || !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(fail(rule.to_owned()));
    }
    Ok(())
}

/// Name of a replica set: a group of projections that scale together (`main-projections`).
///
/// 1 to 63 bytes of ASCII letters, digits, `-`, `_` and `.`, starting with a letter or digit,
/// so that it is safe in logs, metric labels and Kubernetes object names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaSetName(String);

impl ReplicaSetName {
    /// Validates and wraps a replica-set name.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
        let name = name.into();
        check_name(
            "replica set name",
            &name,
            63,
            |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'),
            "use ASCII letters, digits, '-', '_' and '.', starting with a letter or digit",
        )?;
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplicaSetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identity of a worker within a replica set.
///
/// Stable across restarts when the user supplies one (for example the pod name), random otherwise.
/// 1 to 128 bytes of printable ASCII without spaces, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(String);

impl WorkerId {
    /// Validates and wraps a worker id.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidName> {
        let id = id.into();
        check_name(
            "worker id",
            &id,
            128,
            |c| c.is_ascii_graphic(),
            "use printable ASCII without spaces, starting with a letter or digit",
        )?;
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Prefix of every table the SQL adapters create (default `orch_`), so several installations or
/// test runs can share one database.
///
/// Empty, or 1 to 30 bytes of lowercase ASCII letters, digits and `_`, starting with a letter:
/// it is spliced into SQL identifiers, so nothing else is accepted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TablePrefix(String);

impl TablePrefix {
    /// Validates a table prefix.
    pub fn new(prefix: impl Into<String>) -> Result<Self, InvalidName> {
        let prefix = prefix.into();
        if prefix.is_empty() {
            return Ok(Self(prefix));
        }
        let valid = prefix.len() <= 30
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(InvalidName {
                what: "table prefix",
                value: prefix,
                rule:
                    "use at most 30 lowercase ASCII letters, digits and '_', starting with a letter"
                        .to_owned(),
            });
        }
        Ok(Self(prefix))
    }

    /// The prefix as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TablePrefix {
    fn default() -> Self {
        Self("orch_".to_owned())
    }
}

impl fmt::Display for TablePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! counter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// The value before the first one.
            pub const ZERO: Self = Self(0);

            /// The value that follows this one.
            #[must_use]
            pub fn next(self) -> Self {
                Self(self.0 + 1)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

counter!(
    /// Number of a configuration of a replica set (1, 2, 3, ...; 0 = none yet).
    ///
    /// Generations only move forward; creating one is a compare-and-set on the previous number.
    Generation
);
counter!(
    /// Ownership token of one slot: bumped every time the slot changes owner.
    ///
    /// A checkpoint commit carries the epoch under which the worker was granted the slot;
    /// the store refuses it when the slot's epoch has moved on (fencing).
    Epoch
);
counter!(
    /// One registration of a worker id: bumped each time a process registers under that id.
    ///
    /// It tells a restarted process from the zombie it replaced when both use the same id.
    Incarnation
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_set_names() {
        assert!(ReplicaSetName::new("main-projections").is_ok());
        assert!(ReplicaSetName::new("eu.west_2").is_ok());
        for bad in ["", "has space", "-leading", "ünicode", &"x".repeat(64)] {
            let err = ReplicaSetName::new(bad).unwrap_err();
            assert_eq!(err.what, "replica set name");
        }
        let err = ReplicaSetName::new("main projections").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid replica set name \"main projections\": use ASCII letters, digits, '-', '_' and '.', starting with a letter or digit"
        );
    }

    #[test]
    fn a_long_name_is_quoted_briefly() {
        let err = ReplicaSetName::new("x".repeat(5000)).unwrap_err();
        assert_eq!(err.value.len(), 5000);
        assert_eq!(
            err.to_string(),
            format!(
                "invalid replica set name {:?}… (5000 characters): must be at most 63 bytes",
                "x".repeat(40)
            )
        );
        let err = WorkerId::new(format!("a\n{}", " ".repeat(300))).unwrap_err().to_string();
        assert!(err.starts_with("invalid worker id \"a\\n  "), "{err}");
        assert!(err.contains("… (302 characters)") && !err.contains('\n'), "{err}");
    }

    #[test]
    fn worker_ids() {
        assert!(WorkerId::new("projections-7d9f8-abcde").is_ok());
        assert!(WorkerId::new("pod:1/2").is_ok());
        assert!(WorkerId::new("a b").is_err());
        assert!(WorkerId::new("").is_err());
        assert!(WorkerId::new("x".repeat(129)).is_err());
    }

    #[test]
    fn table_prefixes_are_safe_identifiers() {
        assert_eq!(TablePrefix::default().as_str(), "orch_");
        assert!(TablePrefix::new("").is_ok());
        assert!(TablePrefix::new("app2_").is_ok());
        for bad in ["Orch", "1x", "a-b", "x; drop table y", "a\"b", &"a".repeat(31)] {
            assert!(TablePrefix::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn counters_move_forward() {
        assert_eq!(Generation::ZERO.next(), Generation(1));
        assert!(Epoch(3) < Epoch(3).next());
    }
}
