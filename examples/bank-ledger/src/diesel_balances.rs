//! The `account_balances` read model written with diesel (feature `diesel`, PostgreSQL only): the
//! same projection as [`crate::balances::Balances`], under the same name and on the same table, so
//! workers of either kind share its checkpoints and one can replace the other without migrating
//! anything. Its queries run on the runtime's transaction, a diesel-async connection that the
//! store's commit fences and commits together with the checkpoints.

use async_trait::async_trait;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use orchestrator_core::ports::BoxError;
use orchestrator_core::{Event, Scope};
use orchestrator_diesel::DieselTx;
use orchestrator_runtime::{Permanent, Projection};
use orchestrator_serde::EventExt;

use crate::account::AccountEvent;

diesel::table! {
    /// The read model, created by [`crate::balances::SCHEMA`].
    account_balances (account_id) {
        /// The account.
        account_id -> Text,
        /// Its balance in cents.
        balance -> BigInt,
        /// The version of the last event applied.
        version -> BigInt,
    }
}

use account_balances::dsl::{account_balances as balances, account_id, balance, version};

/// Keeps each account's balance and the version of the last event applied to it, with diesel.
#[derive(Debug, Default)]
pub struct DieselBalances;

#[async_trait]
impl Projection<DieselTx> for DieselBalances {
    fn name(&self) -> &str {
        "account_balances"
    }

    fn scope(&self) -> Scope {
        Scope { aggregate_types: vec!["Account".into()], bounded_contexts: vec!["bank".into()] }
    }

    async fn handle(&self, tx: &mut DieselTx, event: &Event) -> Result<(), BoxError> {
        let id = event.stream.aggregate_id.as_str();
        let applied = event.aggregate_version as i64;
        match event.decode::<AccountEvent>().map_err(Permanent::new)? {
            AccountEvent::Opened { .. } => {
                diesel::insert_into(balances)
                    .values((account_id.eq(id), balance.eq(0_i64), version.eq(applied)))
                    .on_conflict(account_id)
                    .do_update()
                    .set(version.eq(applied))
                    .execute(&mut **tx)
                    .await?;
            }
            money => {
                // An account's events arrive in order and exactly once: its row exists.
                let updated = diesel::update(balances.find(id))
                    .set((balance.eq(balance + money.balance_change()), version.eq(applied)))
                    .execute(&mut **tx)
                    .await?;
                if updated != 1 {
                    return Err(format!("no balance row for {id} at version {applied}").into());
                }
            }
        }
        Ok(())
    }

    async fn reset(&self, tx: &mut DieselTx) -> Result<(), BoxError> {
        diesel::delete(balances).execute(&mut **tx).await?;
        Ok(())
    }
}
