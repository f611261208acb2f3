//! Metrics and health over HTTP: an opentelemetry meter provider exporting to a Prometheus
//! registry (plus the standard `process_*` metrics on Linux), and a small server for `/metrics`,
//! `/healthz`, `/readyz` and the status page (`/`, `/status.json`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::health::{HealthBoard, Verdict};
use crate::status::StatusPage;

/// The metrics and health of the workers of one process; give it to each worker with
/// [`crate::Orchestrator::with_telemetry`] and serve it with [`Telemetry::serve`].
///
/// Cloning shares it.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    meter: Meter,
    health: HealthBoard,
    status: StatusPage,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// Setting up the exporter failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the Prometheus exporter: {0}")]
pub struct TelemetryError(String);

impl Telemetry {
    /// A fresh registry and meter provider. On Linux the registry also has the standard process
    /// collector: `process_start_time_seconds`, `process_cpu_seconds_total`,
    /// `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
    /// `process_max_fds` and `process_threads`.
    pub fn new() -> Result<Self, TelemetryError> {
        let registry = prometheus::Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .map_err(|e| TelemetryError(e.to_string()))?;
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            // The names already say `_total` and `_seconds`, as the seed's dashboards expect.
            .without_counter_suffixes()
            .without_units()
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("orchestrator");
        Ok(Self {
            inner: Arc::new(Inner {
                registry,
                provider,
                meter,
                health: HealthBoard::default(),
                status: StatusPage::new(),
            }),
        })
    }

    pub(crate) fn meter(&self) -> &Meter {
        &self.inner.meter
    }

    pub(crate) fn health(&self) -> &HealthBoard {
        &self.inner.health
    }

    /// The status page served at `/`: every worker given this telemetry shows its replica set
    /// there.
    pub fn status_page(&self) -> &StatusPage {
        &self.inner.status
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        // Collection errors are reported by the exporter itself; what was gathered is served.
        let _ = self.inner.provider.force_flush();
        prometheus::TextEncoder::new()
            .encode_to_string(&self.inner.registry.gather())
            .unwrap_or_else(|err| format!("# encoding failed: {err}\n"))
    }

    /// Starts serving `/metrics`, `/healthz`, `/readyz` and the status page (`/`, `/status.json`)
    /// on `addr` in the background, until the returned handle is dropped. Binding errors (address
    /// in use, say) are returned at once.
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<Server> {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(self.clone())
            .merge(self.status_page().routes());
        Server::start(addr, app).await
    }
}

/// A running metrics server; dropping it stops the server.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds `addr` and serves `app` in the background.
    pub(crate) async fn start(addr: SocketAddr, app: Router) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::warn!(%err, "HTTP server stopped");
            }
        });
        Ok(Self { local_addr, task })
    }

    /// The address it listens on (the port chosen when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn metrics(State(telemetry): State<Telemetry>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], telemetry.render()).into_response()
}

fn verdict(result: Verdict) -> Response {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

async fn healthz(State(telemetry): State<Telemetry>) -> Response {
    verdict(telemetry.health().live())
}

async fn readyz(State(telemetry): State<Telemetry>) -> Response {
    verdict(telemetry.health().ready())
}
