//! `worker --diesel`: the worker of `main.rs` with the balances projection written with
//! diesel-async, on a `DieselStore` (the PostgreSQL store plus a diesel pool on the same database).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Result, bail};
use bank_ledger::diesel_balances::DieselBalances;
use orchestrator_diesel::{DieselStore, DieselTx};
use orchestrator_runtime::{Orchestrator, Projection, shutdown_signal};

use crate::Store;

pub(crate) async fn worker(
    store: Store,
    url: &str,
    id: Option<String>,
    metrics: Option<SocketAddr>,
) -> Result<()> {
    let Store::Postgres(pg) = store else {
        bail!("--diesel needs a postgres:// database URL");
    };
    let settings = crate::worker_settings(id)?;
    let (telemetry, _server) = crate::telemetry(metrics).await?;
    let store = DieselStore::open(pg, DieselStore::connect_pool(url, 4).await?).await?;
    let feed = store.change_feed().await?;
    let projections: Vec<Arc<dyn Projection<DieselTx>>> = vec![Arc::new(DieselBalances)];
    eprintln!("bank-ledger worker: the balances projection runs on diesel-async");
    Orchestrator::new(store, settings)?
        .with_change_feed(feed)
        .with_telemetry(&telemetry)
        .run(shutdown_signal(), projections)
        .await?;
    Ok(())
}
