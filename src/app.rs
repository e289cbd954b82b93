//! The running daemon's state ([`App`]), built from a validated config and passed down to every
//! listener and session; [`run`], which binds, serves and shuts down; and [`App::reload`], which
//! applies a new config (SIGHUP) without dropping established sessions.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DatabaseConfig, ListenAddr};
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
    /// The certificate served to clients (`client_tls`), loaded with the config so that a bad
    /// file fails the start or the reload, not the first client.
    pub client_tls: Option<Arc<crate::pg::tls::ClientTls>>,
}

pub struct App {
    config: RwLock<Arc<Config>>,
    pub metrics: Arc<Metrics>,
    pub vault: Arc<VaultClient>,
    pub credentials: Arc<CredentialStore>,
    databases: RwLock<HashMap<String, Arc<Database>>>,
    pub cancels: Arc<CancelMap<Arc<UpstreamSettings>>>,
    pub shutdown: Shutdown,
    /// Bound listeners by address; changed only by `run` and `reload` (one at a time).
    listeners: tokio::sync::Mutex<HashMap<ListenAddr, Bound>>,
}

/// A listener's accept loop and how to stop it.
struct Bound {
    database: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn build_database(index: usize, cfg: &DatabaseConfig) -> Result<Arc<Database>, String> {
    let upstream = UpstreamSettings::from_config(index, cfg)?;
    Ok(Arc::new(Database {
        index,
        name: cfg.name.clone(),
        cfg: cfg.clone(),
        upstream: Arc::new(upstream),
        slots: Arc::new(Semaphore::new(cfg.max_client_connections)),
        client_tls: crate::pg::tls::ClientTls::load(index, cfg)?,
    }))
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl App {
    /// Builds the state; errors (unreadable CA files...) name the config key.
    pub fn new(config: Config) -> Result<Arc<App>, String> {
        let metrics = Arc::new(Metrics::new());
        let vault = VaultClient::new(&config.vault, metrics.clone())?;
        let auth = Auth::new(vault.clone(), config.vault.auth.clone());
        let mut databases = HashMap::new();
        for (index, db) in config.databases.iter().enumerate() {
            databases.insert(db.name.clone(), build_database(index, db)?);
        }
        let credentials = CredentialStore::new(
            vault.clone(),
            auth,
            config.databases.iter().map(|d| (d.name.clone(), d.credentials.clone())),
            config.proxy.vault_error_cache.0,
            metrics.clone(),
        );
        Ok(Arc::new(App {
            config: RwLock::new(Arc::new(config)),
            metrics,
            vault,
            credentials,
            databases: RwLock::new(databases),
            cancels: Arc::default(),
            shutdown: Shutdown::new(),
            listeners: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// The configuration in force (the latest one a reload accepted).
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    pub fn database(&self, name: &str) -> Option<Arc<Database>> {
        self.databases.read().unwrap().get(name).cloned()
    }

    /// Databases in config order.
    pub fn databases_in_order(&self) -> Vec<Arc<Database>> {
        let mut v: Vec<_> = self.databases.read().unwrap().values().cloned().collect();
        v.sort_by_key(|d| d.index);
        v
    }

    /// Binds every listen address of `config` that is not bound yet, or is bound for another
    /// database entry; all or nothing. Returns the new listeners, not yet serving.
    async fn bind_missing(
        &self,
        config: &Config,
        activated: &mut crate::systemd::ActivatedSockets,
    ) -> Result<Vec<(ListenAddr, String, listener::Listener)>, String> {
        let current = self.listeners.lock().await;
        let mut fresh = Vec::new();
        for (i, db) in config.databases.iter().enumerate() {
            for addr in db.listen_addrs() {
                if current.get(&addr).is_some_and(|b| b.database == db.name) {
                    continue;
                }
                if current.contains_key(&addr) {
                    // Moving an address between entries: the old listener must close first.
                    return Err(format!(
                        "databases[{i}].listen: {addr} belongs to another database entry now; remove it in one reload and add it in the next"
                    ));
                }
                match listener::bind_or_take(&addr, db.socket_mode.0, activated).await {
                    Ok(l) => fresh.push((addr, db.name.clone(), l)),
                    // Dropping `fresh` closes what was bound so far.
                    Err(e) => return Err(format!("databases[{i}].listen: cannot listen on {addr}: {e}")),
                }
            }
        }
        Ok(fresh)
    }

    /// Starts serving freshly bound listeners and stops those `config` no longer has.
    async fn swap_listeners(self: &Arc<Self>, config: &Config, fresh: Vec<(ListenAddr, String, listener::Listener)>) {
        let mut current = self.listeners.lock().await;
        for (addr, database, l) in fresh {
            tracing::info!(database = %database, listen = %addr, "listening");
            let stop = CancellationToken::new();
            let task = tokio::spawn(listener::accept_loop(self.clone(), database.clone(), l, stop.clone()));
            current.insert(addr, Bound { database, stop, task });
        }
        let wanted: HashSet<ListenAddr> = config.databases.iter().flat_map(|d| d.listen_addrs()).collect();
        let gone: Vec<ListenAddr> = current.keys().filter(|a| !wanted.contains(*a)).cloned().collect();
        for addr in gone {
            if let Some(b) = current.remove(&addr) {
                tracing::info!(database = %b.database, listen = %addr, "no longer listening");
                b.stop.cancel();
                // The listener socket (and a Unix socket's file) closes when its loop ends.
                let _ = b.task.await;
            }
        }
    }

    /// Applies a new configuration without dropping established sessions: database entries are
    /// added, changed and removed, listeners bound and closed. Refused as a whole (the old
    /// configuration stays) when the new one cannot be applied.
    pub async fn reload(self: &Arc<Self>, new: Config) -> Result<ReloadSummary, String> {
        let old = self.config();
        if new.vault != old.vault {
            return Err("[vault] changed: Vault address and login settings apply at restart; restart dbward".into());
        }
        if new.proxy.worker_threads != old.proxy.worker_threads {
            return Err("proxy.worker_threads changed: it applies at restart; restart dbward".into());
        }
        if new.admin != old.admin {
            return Err("[admin] changed: the admin listener applies at restart; restart dbward".into());
        }
        let mut summary = ReloadSummary::default();
        let mut next = HashMap::new();
        for (i, cfg) in new.databases.iter().enumerate() {
            match self.database(&cfg.name) {
                Some(cur) if cur.cfg == *cfg => {
                    next.insert(cfg.name.clone(), cur);
                }
                Some(_) => {
                    summary.changed.push(cfg.name.clone());
                    next.insert(cfg.name.clone(), build_database(i, cfg)?);
                }
                None => {
                    summary.added.push(cfg.name.clone());
                    next.insert(cfg.name.clone(), build_database(i, cfg)?);
                }
            }
        }
        summary.removed = old
            .databases
            .iter()
            .filter(|d| !next.contains_key(&d.name))
            .map(|d| d.name.clone())
            .collect();
        let fresh = self
            .bind_missing(&new, &mut crate::systemd::ActivatedSockets::none())
            .await?;
        // From here on nothing can fail: switch over.
        self.credentials
            .update_entries(new.databases.iter().map(|d| (d.name.clone(), d.credentials.clone())))
            .await;
        *self.databases.write().unwrap() = next;
        *self.config.write().unwrap() = Arc::new(new.clone());
        self.swap_listeners(&new, fresh).await;
        Ok(summary)
    }

    /// Reads `path` and reloads; errors are logged and the old configuration kept.
    pub async fn reload_file(self: &Arc<Self>, path: &std::path::Path) {
        let new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "reload refused: invalid config; the old one stays in force");
                return;
            }
        };
        match self.reload(new).await {
            Ok(s) => tracing::info!(
                config = %path.display(),
                added = ?s.added,
                changed = ?s.changed,
                removed = ?s.removed,
                "configuration reloaded"
            ),
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "reload refused; the old configuration stays in force")
            }
        }
    }
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Bind(String),
}

/// Binds every listener (all or nothing), serves until `stop` resolves, then shuts down
/// gracefully. Reloads go through [`App::reload_file`] (main.rs calls it on SIGHUP).
pub async fn run(app: Arc<App>, stop: impl std::future::Future<Output = ()>) -> Result<(), RunError> {
    let config = app.config();
    // Socket activation: adopt the sockets systemd passed (matched by address), bind the rest.
    let mut activated = crate::systemd::ActivatedSockets::from_env();
    let fresh = app
        .bind_missing(&config, &mut activated)
        .await
        .map_err(RunError::Bind)?;
    let admin = match &config.admin.listen {
        Some(addr) => Some(
            crate::admin::bind_or_take(addr, &mut activated)
                .await
                .map_err(|e| RunError::Bind(format!("admin.listen: cannot listen on {addr}: {e}")))?,
        ),
        None => None,
    };
    activated.close_unused();
    app.swap_listeners(&config, fresh).await;
    if let Some(admin) = admin {
        tokio::spawn(crate::admin::serve(app.clone(), admin));
    }
    crate::systemd::ready(&format!("serving {} database entries", config.databases.len()));
    tokio::spawn(crate::systemd::watchdog());
    // The lifecycle also warms the cache: every credential is fetched at start, so the first
    // client does not wait on Vault. Failure is not fatal: /readyz reports it meanwhile.
    tokio::spawn(app.credentials.clone().maintain(app.shutdown.clone()));
    stop.await;
    tracing::info!("shutdown requested");
    let grace = app.config().proxy.shutdown_grace.0;
    crate::systemd::stopping(grace);
    app.shutdown.run(grace).await;
    let tasks: Vec<Bound> = app.listeners.lock().await.drain().map(|(_, b)| b).collect();
    for b in tasks {
        b.stop.cancel();
        let _ = b.task.await;
    }
    if app.config().vault.revoke_on_shutdown {
        app.credentials.revoke_all().await;
    }
    tracing::info!("stopped");
    Ok(())
}
