//! The lag metric at a bounded cost: one `backlog` count per distinct (cursors, scope), stopped
//! at [`LAG_COUNT_LIMIT`]; beyond it the estimate of `orchestrator_core::processing::estimate_lag`
//! (docs/configuration.md gives its error bound).

use std::sync::Arc;

use orchestrator_core::processing::{LagQuery, estimate_lag};
use tracing::debug;

use super::{ProcessingStore, Shared};

pub(crate) use orchestrator_core::processing::LAG_COUNT_LIMIT;

/// Records each projection's lag over the owned slots, and the read horizon's stall. Failures
/// only leave the previous figures in place: lag is a measurement, not a reason to stop.
pub(super) async fn measure<S: ProcessingStore>(shared: Arc<Shared<S>>, queries: Vec<LagQuery>) {
    // The store's last position (one index lookup), for the estimates.
    let head = shared.store.head().await.unwrap_or_else(|err| {
        debug!(%err, "Reading the last position failed");
        None
    });
    for mut query in queries {
        // A projection a batch or more behind would only reach the count's limit: where the last
        // position is known, ask for the age alone and estimate the count.
        let skip_count = query.behind && head.is_some();
        query.request.limit = if skip_count { 0 } else { LAG_COUNT_LIMIT as usize };
        let backlog = match shared.store.backlog(&query.request).await {
            Ok(backlog) => backlog,
            Err(err) => {
                debug!(%err, "Measuring lag failed");
                continue;
            }
        };
        let limit = query.request.limit as u64;
        for (projection, parts) in &query.projections {
            let lag = estimate_lag(backlog.events, limit, head, parts);
            let name = shared.projections[*projection].name();
            shared.metrics.lag(name, lag.events, backlog.oldest_age);
        }
    }
    match shared.store.read_horizon_stall().await {
        Ok(stall) => shared.metrics.horizon_stall(stall.unwrap_or_default()),
        Err(err) => debug!(%err, "Measuring the read horizon failed"),
    }
}
