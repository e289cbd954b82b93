//! The running daemon's state ([`App`]), built from a validated config and passed down to every
//! listener and session, and [`run`], which binds, serves and shuts down.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::config::{Config, DatabaseConfig};
use crate::credentials::CredentialStore;
use crate::listener;
use crate::metrics::Metrics;
use crate::pg::cancel::CancelMap;
use crate::shutdown::Shutdown;
use crate::upstream::UpstreamSettings;
use crate::vault::{Auth, VaultClient};

/// One `[[databases]]` entry, ready to serve.
pub struct Database {
    pub index: usize,
    pub name: String,
    pub cfg: DatabaseConfig,
    pub upstream: Arc<UpstreamSettings>,
    /// One permit per client connection: `max_client_connections`.
    pub slots: Arc<Semaphore>,
}

pub struct App {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub vault: Arc<VaultClient>,
    pub credentials: Arc<CredentialStore>,
    pub databases: HashMap<String, Arc<Database>>,
    pub cancels: Arc<CancelMap<Arc<UpstreamSettings>>>,
    pub shutdown: Shutdown,
}

impl App {
    /// Builds the state; errors (unreadable CA files...) name the config key.
    pub fn new(config: Config) -> Result<Arc<App>, String> {
        let metrics = Arc::new(Metrics::new());
        let vault = VaultClient::new(&config.vault, metrics.clone())?;
        let auth = Auth::new(vault.clone(), config.vault.auth.clone());
        let mut databases = HashMap::new();
        for (index, db) in config.databases.iter().enumerate() {
            let upstream = UpstreamSettings::from_config(index, db)?;
            databases.insert(
                db.name.clone(),
                Arc::new(Database {
                    index,
                    name: db.name.clone(),
                    cfg: db.clone(),
                    upstream: Arc::new(upstream),
                    slots: Arc::new(Semaphore::new(db.max_client_connections)),
                }),
            );
        }
        let credentials = CredentialStore::new(
            vault.clone(),
            auth,
            config.databases.iter().map(|d| (d.name.clone(), d.credentials.clone())),
            config.proxy.vault_error_cache.0,
            metrics.clone(),
        );
        Ok(Arc::new(App {
            config,
            metrics,
            vault,
            credentials,
            databases,
            cancels: Arc::default(),
            shutdown: Shutdown::new(),
        }))
    }

    pub fn database(&self, name: &str) -> Option<&Arc<Database>> {
        self.databases.get(name)
    }

    /// Databases in config order.
    pub fn databases_in_order(&self) -> Vec<Arc<Database>> {
        let mut v: Vec<_> = self.databases.values().cloned().collect();
        v.sort_by_key(|d| d.index);
        v
    }
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Bind(String),
}

/// Binds every listener (all or nothing), serves until `stop` resolves, then shuts down gracefully.
pub async fn run(app: Arc<App>, stop: impl std::future::Future<Output = ()>) -> Result<(), RunError> {
    let mut bound = Vec::new();
    for db in app.databases_in_order() {
        for addr in db.cfg.listen_addrs() {
            let l = listener::bind(&addr, db.cfg.socket_mode.0)
                .await
                .map_err(|e| RunError::Bind(format!("databases[{}].listen: cannot listen on {addr}: {e}", db.index)))?;
            tracing::info!(database = %db.name, listen = %addr, "listening");
            bound.push((db.clone(), l));
        }
    }
    let admin = match &app.config.admin.listen {
        Some(addr) => Some(
            crate::admin::bind(addr)
                .await
                .map_err(|e| RunError::Bind(format!("admin.listen: cannot listen on {addr}: {e}")))?,
        ),
        None => None,
    };
    let mut tasks = Vec::new();
    for (db, l) in bound {
        tasks.push(tokio::spawn(listener::accept_loop(app.clone(), db, l)));
    }
    if let Some(admin) = admin {
        tokio::spawn(crate::admin::serve(app.clone(), admin));
    }
    tokio::spawn(app.credentials.clone().maintain(app.shutdown.clone()));
    // The lifecycle also warms the cache: every credential is fetched at start, so the first
    // client does not wait on Vault. Failure is not fatal: /readyz reports it meanwhile.
    stop.await;
    tracing::info!("shutdown requested");
    app.shutdown.run(app.config.proxy.shutdown_grace.0).await;
    for t in tasks {
        let _ = t.await;
    }
    if app.config.vault.revoke_on_shutdown {
        app.credentials.revoke_all().await;
    }
    tracing::info!("stopped");
    Ok(())
}
