//! LISTEN/NOTIFY: appends and coordination changes notify; idle workers wake at once.

use async_trait::async_trait;
use orchestrator_core::ReplicaSetName;
use orchestrator_core::ports::{Change, ChangeFeed, StoreError, StoreResult};
use sqlx::postgres::PgListener;

use crate::PgStore;
use crate::error::classify;

/// A [`ChangeFeed`] on PostgreSQL's LISTEN/NOTIFY; it reconnects by itself after a lost connection.
#[derive(Debug)]
pub struct PgChangeFeed {
    listener: PgListener,
    events_channel: String,
}

impl PgStore {
    /// Listens for this store's notifications (one dedicated connection).
    pub async fn change_feed(&self) -> StoreResult<PgChangeFeed> {
        let err = |e| classify("listen for changes", e);
        let mut listener = PgListener::connect_with(&self.pool).await.map_err(err)?;
        listener
            .listen_all([
                self.tables.events_channel.as_str(),
                self.tables.coordination_channel.as_str(),
            ])
            .await
            .map_err(err)?;
        Ok(PgChangeFeed { listener, events_channel: self.tables.events_channel.clone() })
    }
}

#[async_trait]
impl ChangeFeed for PgChangeFeed {
    async fn next_change(&mut self) -> StoreResult<Change> {
        let notification =
            self.listener.recv().await.map_err(|e| classify("wait for a notification", e))?;
        if notification.channel() == self.events_channel {
            return Ok(Change::Events);
        }
        ReplicaSetName::new(notification.payload()).map(Change::Coordination).map_err(|e| {
            StoreError::Other {
                message: format!("unexpected notification payload: {e}"),
                source: None,
            }
        })
    }
}
