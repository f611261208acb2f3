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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Position in the adapter's sequence (1, 2, ...); recorded once applied.
    pub version: i32,
    /// A name for the record and for error messages.
    pub name: &'static str,
    /// SQL; several statements are allowed.
    pub sql: &'static str,
}

/// What the two migration ledgers' SQL differs in between databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerDialect {
    /// Type and default of an `applied_at` column: when the row was written, by the database.
    pub applied_at: &'static str,
}

/// A store's migration ledgers under one prefix: `schema_migrations` records the adapter's
/// [`Migration`]s by version, `application_migrations` the application's [`SchemaMigration`]s by
/// name. The rules of a migration run live here, so that every SQL adapter applies the same
/// steps in the same order: the adapter takes its lock, creates the ledgers, reads what they hold,
/// and runs the scripts of [`MigrationLedger::pending`] and
/// [`MigrationLedger::pending_application`] in its transaction.
#[derive(Debug, Clone)]
pub struct MigrationLedger {
    prefix: String,
    dialect: LedgerDialect,
}

/// One script of a migration run; it records itself in its ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStep {
    /// What the step does, for an error message (`apply 0001_accounts`).
    pub what: String,
    /// Its statements, the ledger's record last.
    pub script: String,
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

    /// The adapter's scripts still to run, in order: its migrations not in `versions`, then the
    /// event store's slot count, recorded unless one is. The adapter then reads the slot count
    /// back and refuses a different one before [`MigrationLedger::pending_application`].
    pub fn pending(
        &self,
        migrations: &[Migration],
        versions: &[i32],
        slot_count: crate::SlotCount,
    ) -> Vec<MigrationStep> {
        let p = &self.prefix;
        let own =
            migrations.iter().filter(|m| !versions.contains(&m.version)).map(|m| MigrationStep {
                what: "migrate".to_owned(),
                script: format!(
                    "{}\n;\nINSERT INTO {p}schema_migrations (version, name) VALUES ({}, {})",
                    m.sql.replace("{prefix}", p),
                    m.version,
                    literal(m.name)
                ),
            });
        let slots = MigrationStep {
            what: "migrate".to_owned(),
            script: format!(
                "INSERT INTO {p}meta (key, value) VALUES ('slot_count', '{}') \
                 ON CONFLICT (key) DO NOTHING",
                slot_count.get()
            ),
        };
        own.chain(std::iter::once(slots)).collect()
    }

    /// The application's steps not in `names`, in the order given.
    pub fn pending_application(
        &self,
        schema: &[SchemaMigration],
        names: &[String],
    ) -> Vec<MigrationStep> {
        let p = &self.prefix;
        schema
            .iter()
            .filter(|step| !names.iter().any(|name| name == step.name))
            .map(|step| MigrationStep {
                what: format!("apply {}", step.name),
                script: format!(
                    "{}\n;\nINSERT INTO {p}application_migrations (name) VALUES ({})",
                    step.sql,
                    literal(step.name)
                ),
            })
            .collect()
    }
}

/// `text` as an SQL string literal (standard quoting, which both PostgreSQL and SQLite read).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
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
            LedgerDialect { applied_at: "TEXT" },
        )
    }

    #[test]
    fn a_run_applies_what_the_ledgers_lack_in_order_each_step_recording_itself() {
        let app = [
            SchemaMigration { name: "0001_a", sql: "CREATE TABLE a (x INT) -- a comment" },
            SchemaMigration { name: "0002_b", sql: "CREATE TABLE b (x INT);" },
        ];
        let ledger = ledger();
        let mut steps = ledger.pending(&OWN, &[1], SlotCount::default());
        steps.extend(ledger.pending_application(&app, &["0001_a".to_owned()]));
        let scripts: Vec<&str> = steps.iter().map(|s| s.script.as_str()).collect();
        assert_eq!(
            scripts,
            [
                "CREATE TABLE orch_more (k TEXT)\n;\n\
             INSERT INTO orch_schema_migrations (version, name) VALUES (2, 'more')",
                "INSERT INTO orch_meta (key, value) VALUES ('slot_count', '256') \
             ON CONFLICT (key) DO NOTHING",
                "CREATE TABLE b (x INT);\n;\nINSERT INTO orch_application_migrations (name) \
             VALUES ('0002_b')",
            ]
        );
        assert_eq!(steps[2].what, "apply 0002_b");
    }

    #[test]
    fn a_name_with_a_quote_is_recorded_as_written() {
        let app = [SchemaMigration { name: "it's", sql: "SELECT 1" }];
        let steps = ledger().pending_application(&app, &[]);
        assert!(steps[0].script.ends_with("VALUES ('it''s')"), "{}", steps[0].script);
    }
}
