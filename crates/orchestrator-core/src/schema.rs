//! The application's own schema (read models, outbox, command log), applied by the adapters'
//! `migrate_with` under the same lock as the orchestrator's tables.

/// One step of an application's schema: SQL run once, recorded under its name.
///
/// Steps run in the order given, each at most once per database and table prefix, inside the
/// migration transaction and lock, so workers starting together never race on DDL. Give a step a
/// new name rather than editing one that has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaMigration {
    /// Unique name (`0001_account_balances`).
    pub name: &'static str,
    /// SQL; several statements are allowed.
    pub sql: &'static str,
}
