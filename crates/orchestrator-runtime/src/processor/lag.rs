//! The lag metric at a bounded cost: one `backlog` count per distinct (cursors, scope), stopped
//! at [`LAG_COUNT_LIMIT`]; beyond it the estimate of `orchestrator_core::processing::estimate_lag`
//! (docs/configuration.md gives its error bound).

use std::sync::Arc;

use orchestrator_core::processing::{LagQuery, estimate_lag};
use tracing::debug;

use super::Shared;
use crate::Store;

pub(crate) use orchestrator_core::processing::LAG_COUNT_LIMIT;

/// Records each projection's lag over the owned slots, and the read horizon's stall. Failures
/// only leave the previous figures in place: lag is a measurement, not a reason to stop.
pub(super) async fn measure<S: Store>(shared: Arc<Shared<S>>, queries: Vec<LagQuery>) {
    let mut head: Option<Option<u64>> = None;
    for query in queries {
        let backlog = match shared.store.backlog(&query.request).await {
            Ok(backlog) => backlog,
            Err(err) => {
                debug!(%err, "Measuring lag failed");
                continue;
            }
        };
        if backlog.events >= LAG_COUNT_LIMIT && head.is_none() {
            // Only a count that reached the limit needs the store's last position.
            head = Some(shared.store.head().await.unwrap_or_else(|err| {
                debug!(%err, "Reading the last position failed");
                None
            }));
        }
        for (projection, parts) in &query.projections {
            let lag = estimate_lag(backlog.events, LAG_COUNT_LIMIT, head.flatten(), parts);
            let name = shared.projections[*projection].name();
            shared.metrics.lag(name, lag.events, backlog.oldest_age);
        }
    }
    match shared.store.read_horizon_stall().await {
        Ok(stall) => shared.metrics.horizon_stall(stall.unwrap_or_default()),
        Err(err) => debug!(%err, "Measuring the read horizon failed"),
    }
}
