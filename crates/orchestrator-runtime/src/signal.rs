//! Shutdown on the signals a process manager sends.

/// Completes on SIGTERM (Kubernetes stopping a pod, `docker stop`) or SIGINT (Ctrl-C); pass it to
/// [`Orchestrator::run`](crate::Orchestrator::run) so the worker leaves gracefully. Each call
/// returns a new future, so several replica sets in one process can each take one.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
