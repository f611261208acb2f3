//! The PostgreSQL adapter's fenced commit (and its dead letters' writes) run through diesel: each statement of
//! `orchestrator_postgres::Fencing`, bound with diesel's `sql_query` on the projection's own
//! connection, inside its transaction.

use async_trait::async_trait;
use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};
use diesel_async::RunQueryDsl;
use orchestrator_core::ports::StoreResult;
use orchestrator_postgres::{Claim, FencingTx};

use crate::{DieselTx, classify_error};

const COMMIT: &str = "commit checkpoints";

#[derive(QueryableByName)]
struct Progress {
    #[diesel(sql_type = Nullable<Bool>)]
    owned: Option<bool>,
    #[diesel(sql_type = BigInt)]
    advanced: i64,
}

#[derive(QueryableByName)]
struct PerSlot {
    #[diesel(sql_type = Nullable<Bool>)]
    owned: Option<bool>,
    #[diesel(sql_type = Array<Integer>)]
    advanced: Vec<i32>,
}

#[derive(QueryableByName)]
struct Owned {
    #[diesel(sql_type = Integer)]
    slot: i32,
}

#[async_trait]
impl FencingTx for DieselTx {
    async fn execute_text(&mut self, what: &str, sql: &str, params: &[&str]) -> StoreResult<()> {
        let mut query = diesel::sql_query(sql).into_boxed();
        for param in params {
            query = query.bind::<Text, _>(*param);
        }
        query.execute(self.conn()).await.map(drop).map_err(|e| classify_error(what, e))
    }

    async fn execute_count(&mut self, what: &str, sql: &str, params: &[&str]) -> StoreResult<u64> {
        let mut query = diesel::sql_query(sql).into_boxed();
        for param in params {
            query = query.bind::<Text, _>(*param);
        }
        let count = query.execute(self.conn()).await.map_err(|e| classify_error(what, e))?;
        Ok(count as u64)
    }

    async fn advance_progress(
        &mut self,
        sql: &str,
        claim: &Claim<'_>,
        to: (i64, i64),
    ) -> StoreResult<Option<(bool, i64)>> {
        let row = diesel::sql_query(sql)
            .bind::<Text, _>(claim.replica_set)
            .bind::<Text, _>(claim.projection)
            .bind::<Array<Integer>, _>(claim.slots)
            .bind::<BigInt, _>(to.0)
            .bind::<BigInt, _>(to.1)
            .bind::<Array<BigInt>, _>(claim.epochs)
            .bind::<Text, _>(claim.worker)
            .get_result::<Progress>(self.conn())
            .await
            .map_err(|e| classify_error(COMMIT, e))?;
        Ok(row.owned.map(|owned| (owned, row.advanced)))
    }

    async fn advance_slots(
        &mut self,
        sql: &str,
        claim: &Claim<'_>,
        commits: &[i64],
        globals: &[i64],
    ) -> StoreResult<Option<(bool, Vec<i32>)>> {
        let row = diesel::sql_query(sql)
            .bind::<Text, _>(claim.replica_set)
            .bind::<Text, _>(claim.projection)
            .bind::<Array<Integer>, _>(claim.slots)
            .bind::<Array<BigInt>, _>(commits)
            .bind::<Array<BigInt>, _>(globals)
            .bind::<Array<BigInt>, _>(claim.epochs)
            .bind::<Text, _>(claim.worker)
            .get_result::<PerSlot>(self.conn())
            .await
            .map_err(|e| classify_error(COMMIT, e))?;
        Ok(row.owned.map(|owned| (owned, row.advanced)))
    }

    async fn owned_slots(&mut self, sql: &str, claim: &Claim<'_>) -> StoreResult<Vec<i32>> {
        let rows = diesel::sql_query(sql)
            .bind::<Text, _>(claim.replica_set)
            .bind::<Array<Integer>, _>(claim.slots)
            .bind::<Array<BigInt>, _>(claim.epochs)
            .bind::<Text, _>(claim.worker)
            .load::<Owned>(self.conn())
            .await
            .map_err(|e| classify_error(COMMIT, e))?;
        Ok(rows.into_iter().map(|r| r.slot).collect())
    }
}
