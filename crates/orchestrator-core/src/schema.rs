//! Schema migrations: the application's own steps (read models, outbox, command log), applied by
//! the adapters' `migrate_with` under the same lock as the orchestrator's tables, and the ledger
//! rules every SQL adapter applies both by.

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

/// One of an adapter's own migrations: SQL with `{prefix}` where table names take the prefix.
/// Its name is recorded as written, so it is a plain word (`dead_letters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Position in the adapter's sequence (1, 2, ...); recorded once applied.
    pub version: i32,
    /// A name for the record and for error messages.
    pub name: &'static str,
    /// SQL; several statements are allowed.
    pub sql: &'static str,
}

impl Migration {
    /// Migration `version`, named `name`, running `sql`.
    pub const fn new(version: i32, name: &'static str, sql: &'static str) -> Self {
        Self { version, name, sql }
    }
}

/// What the two migration ledgers' SQL differs in between databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerDialect {
    /// Type and default of an `applied_at` column: when the row was written, by the database.
    pub applied_at: &'static str,
    /// How a statement names its first bound parameter (`$1`, `?1`).
    pub parameter: &'static str,
}

/// A store's migration ledgers under one prefix: `schema_migrations` records the adapter's
/// [`Migration`]s by version, `application_migrations` the application's [`SchemaMigration`]s by
/// name. The rules of a migration run live here, so that every SQL adapter applies the same
/// steps in the same order: the adapter takes its lock, creates the ledgers, reads what they hold,
/// and runs [`MigrationLedger::pending`] and [`MigrationLedger::pending_application`] in its
/// transaction.
#[derive(Debug, Clone)]
pub struct MigrationLedger {
    prefix: String,
    dialect: LedgerDialect,
}

impl MigrationLedger {
    /// The ledgers under `prefix`.
    pub fn new(prefix: &crate::TablePrefix, dialect: LedgerDialect) -> Self {
        Self { prefix: prefix.as_str().to_owned(), dialect }
    }

    /// Creates both ledgers unless they exist.
    pub fn create_sql(&self) -> String {
        let (p, applied_at) = (&self.prefix, self.dialect.applied_at);
        format!(
            "CREATE TABLE IF NOT EXISTS {p}schema_migrations (\n\
             \x20   version INTEGER PRIMARY KEY,\n\
             \x20   name TEXT NOT NULL,\n\
             \x20   applied_at {applied_at});\n\
             CREATE TABLE IF NOT EXISTS {p}application_migrations (\n\
             \x20   name TEXT PRIMARY KEY,\n\
             \x20   applied_at {applied_at})"
        )
    }

    /// The versions of the adapter's migrations applied so far (one `INTEGER` column).
    pub fn applied_versions_sql(&self) -> String {
        format!("SELECT version FROM {}schema_migrations", self.prefix)
    }

    /// The names of the application's steps applied so far (one `TEXT` column).
    pub fn applied_names_sql(&self) -> String {
        format!("SELECT name FROM {}application_migrations", self.prefix)
    }

    /// The adapter's scripts still to run, in order, each recording itself in its ledger: its
    /// migrations not in `versions`, then the event store's slot count, recorded unless one is.
    /// The adapter then reads the slot count back, refusing a different one, before
    /// [`MigrationLedger::pending_application`].
    pub fn pending(
        &self,
        migrations: &[Migration],
        versions: &[i32],
        slot_count: crate::SlotCount,
    ) -> Vec<String> {
        let p = &self.prefix;
        let own = migrations.iter().filter(|m| !versions.contains(&m.version)).map(|m| {
            format!(
                "{}\n;\nINSERT INTO {p}schema_migrations (version, name) VALUES ({}, '{}')",
                m.sql.replace("{prefix}", p),
                m.version,
                m.name
            )
        });
        let slots = format!(
            "INSERT INTO {p}meta (key, value) VALUES ('slot_count', '{}') \
             ON CONFLICT (key) DO NOTHING",
            slot_count.get()
        );
        own.chain(std::iter::once(slots)).collect()
    }

    /// The application's steps not in `names`, in the order given. The adapter runs each step's
    /// SQL, then [`MigrationLedger::record_name_sql`] with the step's name bound.
    pub fn pending_application<'a>(
        &self,
        schema: &'a [SchemaMigration],
        names: &'a [String],
    ) -> impl Iterator<Item = &'a SchemaMigration> {
        schema.iter().filter(move |step| !names.iter().any(|name| name == step.name))
    }

    /// Records an application step as applied; its name is the one parameter.
    pub fn record_name_sql(&self) -> String {
        format!(
            "INSERT INTO {}application_migrations (name) VALUES ({})",
            self.prefix, self.dialect.parameter
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SlotCount, TablePrefix};

    const OWN: [Migration; 2] = [
        Migration { version: 1, name: "init", sql: "CREATE TABLE {prefix}meta (k TEXT)" },
        Migration { version: 2, name: "more", sql: "CREATE TABLE {prefix}more (k TEXT)" },
    ];

    fn ledger() -> MigrationLedger {
        MigrationLedger::new(
            &TablePrefix::new("orch_").unwrap(),
            LedgerDialect { applied_at: "TEXT", parameter: "?1" },
        )
    }

    #[test]
    fn a_run_applies_what_the_ledgers_lack_in_order_each_step_recording_itself() {
        let scripts = ledger().pending(&OWN, &[1], SlotCount::default());
        assert_eq!(
            scripts,
            [
                "CREATE TABLE orch_more (k TEXT)\n;\n\
             INSERT INTO orch_schema_migrations (version, name) VALUES (2, 'more')",
                "INSERT INTO orch_meta (key, value) VALUES ('slot_count', '256') \
             ON CONFLICT (key) DO NOTHING",
            ]
        );
    }

    #[test]
    fn the_application_steps_not_recorded_run_in_the_order_given() {
        let app = [
            SchemaMigration { name: "0002_b", sql: "CREATE TABLE b (x INT)" },
            SchemaMigration { name: "0001_a", sql: "CREATE TABLE a (x INT)" },
            SchemaMigration { name: "0003_c", sql: "CREATE TABLE c (x INT)" },
        ];
        let ledger = ledger();
        let pending: Vec<&str> =
            ledger.pending_application(&app, &["0001_a".to_owned()]).map(|s| s.name).collect();
        assert_eq!(pending, ["0002_b", "0003_c"]);
        assert_eq!(
            ledger.record_name_sql(),
            "INSERT INTO orch_application_migrations (name) VALUES (?1)"
        );
    }
}
