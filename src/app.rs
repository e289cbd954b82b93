//! The running daemon: [`App`] owns the long-lived parts (credential store, cancel map, metrics,
//! shutdown, the published [`Snapshot`] and the bound listeners); [`run`] binds, serves and shuts
//! down; [`App::reload`] applies a new config (SIGHUP) without dropping established sessions.
//! Listeners, sessions and the admin server never see `App`: each gets the few parts it uses.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminContext;
use crate::config::{Config, ListenAddr};
use crate::credentials::CredentialStore;
use crate::entry::{Database, Entries, EntryError, Snapshot};
use crate::listener::{self, Listener, Services};
use crate::metrics::Metrics;
use crate::pg::cancel::CancelMap;
use crate::shutdown::Shutdown;
use crate::systemd::ActivatedSockets;
use crate::vault::{Auth, VaultClient};

pub struct App {
    entries: Entries,
    services: Services,
    /// Bound listeners by address; changed only by `run` and `reload` (one at a time).
    listeners: tokio::sync::Mutex<HashMap<ListenAddr, Bound>>,
}

/// A listener's accept loop and how to stop it.
struct Bound {
    database: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ReloadSummary {
    pub(crate) added: Vec<String>,
    pub(crate) changed: Vec<String>,
    pub(crate) removed: Vec<String>,
}

/// Why the daemon could not be built from a config that passed validation: a file it names
/// (CA, certificate, key) cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Entry(#[from] EntryError),
    #[error(transparent)]
    Vault(#[from] crate::vault::error::VaultSetupError),
}

/// A listen address that cannot be bound; `key` is the config key (`databases[0].listen`).
#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot listen on {addr}: {source}")]
pub struct BindError {
    key: String,
    addr: String,
    source: std::io::Error,
}

/// Why a reload was refused; the old configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{section} changed: {what} at restart; restart dbward")]
    NeedsRestart { section: &'static str, what: &'static str },
    #[error("databases[{index}].listen: {addr} belongs to another database entry now; remove it in one reload and add it in the next")]
    ListenerMoved { index: usize, addr: ListenAddr },
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Entry(#[from] EntryError),
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Listeners of the config could not be set up (a bind failed).
    #[error(transparent)]
    Listen(#[from] ReloadError),
}

impl App {
    /// Builds the state; errors (unreadable CA files...) name the config key.
    pub fn new(config: Config) -> Result<Arc<App>, SetupError> {
        let metrics = Arc::new(Metrics::new());
        let vault = VaultClient::new(&config.vault, metrics.clone()).map_err(SetupError::Vault)?;
        let auth = Auth::new(vault.clone(), config.vault.auth.clone());
        let credentials = CredentialStore::new(
            vault,
            auth,
            config.databases.iter().map(|d| (d.name.clone(), d.credentials.clone())),
            config.proxy.vault_error_cache,
            metrics.clone(),
        );
        let snapshot = Snapshot::build(config)?;
        Ok(Arc::new(App {
            entries: Arc::new(ArcSwap::from_pointee(snapshot)),
            services: Services {
                credentials,
                cancels: Arc::new(CancelMap::default()),
                metrics,
                shutdown: Shutdown::new(),
                streaming: crate::session::streaming::Streaming::for_current_runtime(),
            },
            listeners: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// The configuration in force (the latest one a reload accepted).
    fn config(&self) -> Arc<Config> {
        self.entries.load().config.clone()
    }

    fn admin_context(&self) -> AdminContext {
        AdminContext {
            entries: self.entries.clone(),
            credentials: self.services.credentials.clone(),
            metrics: self.services.metrics.clone(),
            shutdown: self.services.shutdown.clone(),
        }
    }

    /// Binds every listen address of `config` that is not bound yet, or is bound for another
    /// database entry; all or nothing. Returns the new listeners, not yet serving.
    async fn bind_missing(
        &self,
        config: &Config,
        activated: &mut ActivatedSockets,
    ) -> Result<Vec<(ListenAddr, String, Listener)>, ReloadError> {
        let current = self.listeners.lock().await;
        let mut fresh = Vec::new();
        for (i, db) in config.databases.iter().enumerate() {
            for addr in db.listen.iter().cloned() {
                if current.get(&addr).is_some_and(|b| b.database == db.name) {
                    continue;
                }
                if current.contains_key(&addr) {
                    // Moving an address between entries: the old listener must close first.
                    return Err(ReloadError::ListenerMoved { index: i, addr });
                }
                match listener::bind_or_take(&addr, db.socket_mode, activated).await {
                    Ok(l) => fresh.push((addr, db.name.clone(), l)),
                    // Dropping `fresh` closes what was bound so far.
                    Err(source) => {
                        return Err(BindError {
                            key: format!("databases[{i}].listen"),
                            addr: addr.to_string(),
                            source,
                        }
                        .into())
                    }
                }
            }
        }
        Ok(fresh)
    }

    /// Starts serving freshly bound listeners and stops those `config` no longer has.
    async fn swap_listeners(&self, config: &Config, fresh: Vec<(ListenAddr, String, Listener)>) {
        let mut current = self.listeners.lock().await;
        for (addr, database, l) in fresh {
            tracing::info!(database = %database, listen = %addr, "listening");
            let stop = CancellationToken::new();
            let task = tokio::spawn(listener::accept_loop(
                self.entries.clone(),
                self.services.clone(),
                database.clone(),
                l,
                stop.clone(),
            ));
            current.insert(addr, Bound { database, stop, task });
        }
        let wanted: HashSet<ListenAddr> = config.databases.iter().flat_map(|d| d.listen.iter().cloned()).collect();
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
    pub(crate) async fn reload(&self, new: Config) -> Result<ReloadSummary, ReloadError> {
        let old = self.entries.load_full();
        let restart = |section, what| Err(ReloadError::NeedsRestart { section, what });
        if new.vault != old.config.vault {
            return restart("[vault]", "Vault address and login settings apply");
        }
        if new.proxy.worker_threads != old.config.proxy.worker_threads {
            return restart("proxy.worker_threads", "it applies");
        }
        if new.admin != old.config.admin {
            return restart("[admin]", "the admin listener applies");
        }
        let mut summary = ReloadSummary::default();
        let mut databases = Vec::with_capacity(new.databases.len());
        for (i, cfg) in new.databases.iter().enumerate() {
            match old.database(&cfg.name) {
                Some(cur) if cur.cfg == *cfg => databases.push(cur.clone()),
                Some(_) => {
                    summary.changed.push(cfg.name.clone());
                    databases.push(Database::build(i, cfg)?);
                }
                None => {
                    summary.added.push(cfg.name.clone());
                    databases.push(Database::build(i, cfg)?);
                }
            }
        }
        summary.removed = old
            .databases
            .iter()
            .filter(|d| !new.databases.iter().any(|n| n.name == d.name))
            .map(|d| d.name.clone())
            .collect();
        let fresh = self.bind_missing(&new, &mut ActivatedSockets::none()).await?;
        // From here on nothing can fail: switch over.
        self.services
            .credentials
            .update_entries(new.databases.iter().map(|d| (d.name.clone(), d.credentials.clone())))
            .await;
        let config = Arc::new(new);
        self.entries.store(Arc::new(Snapshot {
            config: config.clone(),
            databases,
        }));
        self.swap_listeners(&config, fresh).await;
        Ok(summary)
    }

    /// Reads `path` and reloads; errors are logged and the old configuration kept.
    pub async fn reload_file(&self, path: &std::path::Path) {
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

/// Binds every listener (all or nothing), serves until `stop` resolves, then shuts down
/// gracefully. Reloads go through [`App::reload_file`] (main.rs calls it on SIGHUP).
pub async fn run(app: Arc<App>, stop: impl std::future::Future<Output = ()>) -> Result<(), RunError> {
    let config = app.config();
    // Socket activation: adopt the sockets systemd passed (matched by address), bind the rest.
    let mut activated = ActivatedSockets::from_env();
    let fresh = app.bind_missing(&config, &mut activated).await?;
    let admin = match &config.admin.listen {
        Some(addr) => Some(
            crate::admin::bind_or_take(*addr, &mut activated)
                .await
                .map_err(|source| BindError {
                    key: "admin.listen".into(),
                    addr: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    activated.close_unused();
    crate::peer::warn_open_entries(&config);
    // The state file is taken over before the first client is served (they wait in the
    // listen backlog meanwhile), or a client would mint the credential the file holds. Bounded:
    // whatever is not checked by then is fetched anew.
    if let Some(path) = config.vault.state_file.clone() {
        let creds = &app.services.credentials;
        let bound = config.vault.request_timeout + std::time::Duration::from_secs(5);
        if tokio::time::timeout(bound, creds.restore_state(&path)).await.is_err() {
            tracing::warn!("the state file was not fully checked within {bound:?}; the rest is fetched anew");
        }
        tokio::spawn(creds.clone().keep_state(path, app.services.shutdown.clone()));
    }
    app.swap_listeners(&config, fresh).await;
    if let Some(admin) = admin {
        tokio::spawn(crate::admin::serve(app.admin_context(), admin));
    }
    crate::systemd::ready(&format!("serving {} database entries", config.databases.len()));
    tokio::spawn(crate::systemd::watchdog());
    let services = &app.services;
    // The lifecycle also warms the cache: every credential is fetched at start, so the first
    // client does not wait on Vault. Failure is not fatal: /readyz reports it meanwhile.
    tokio::spawn(services.credentials.clone().maintain(services.shutdown.clone()));
    stop.await;
    tracing::info!("shutdown requested");
    let grace = app.config().proxy.shutdown_grace;
    crate::systemd::stopping(grace);
    services.shutdown.run(grace).await;
    let tasks: Vec<Bound> = app.listeners.lock().await.drain().map(|(_, b)| b).collect();
    for b in tasks {
        b.stop.cancel();
        let _ = b.task.await;
    }
    if app.config().vault.revoke_on_shutdown {
        services.credentials.revoke_all().await;
    }
    // Revoking the token revokes its leases too, so it follows revoke_on_shutdown. A token kept
    // for the next start (vault.state_file) skips it: the next start reuses it.
    if app.config().vault.revoke_on_shutdown && app.config().vault.state_file.is_none() {
        services.credentials.revoke_vault_tokens().await;
    }
    tracing::info!("stopped");
    Ok(())
}
