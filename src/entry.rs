//! The serving state a reload replaces as one: the configuration in force and the database
//! entries built from it ([`Snapshot`]), published through one [`ArcSwap`] so that a listener,
//! the admin server and a reload never see the databases of one config with the settings of
//! another.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::config::{Config, DatabaseConfig};
use crate::pg::tls::{ClientTls, ServerTlsError};
use crate::upstream::{SettingsError, UpstreamSettings};

/// One `[[databases]]` entry, ready to serve: what a session needs of its entry.
pub(crate) struct Database {
    pub(crate) name: String,
    pub(crate) cfg: DatabaseConfig,
    pub(crate) upstream: Arc<UpstreamSettings>,
    /// One permit per client connection: `max_client_connections`.
    pub(crate) slots: Arc<Semaphore>,
    /// The certificate served to clients (`client_tls`), loaded with the config so that a bad
    /// file fails the start or the reload, not the first client.
    pub(crate) client_tls: Option<Arc<ClientTls>>,
    /// Kept upstream connections (`[databases.pool]`); None: reuse is off.
    pub(crate) pool: Option<Arc<crate::pool::Pool>>,
}

impl Database {
    /// Reads the entry's files (CA, client certificate, client TLS); errors name the config key.
    pub(crate) fn build(index: usize, cfg: &DatabaseConfig) -> Result<Arc<Database>, EntryError> {
        let upstream = UpstreamSettings::from_config(index, cfg)?;
        Ok(Arc::new(Database {
            name: cfg.name.clone(),
            cfg: cfg.clone(),
            upstream: Arc::new(upstream),
            slots: Arc::new(Semaphore::new(cfg.max_client_connections)),
            client_tls: ClientTls::load(index, cfg)?,
            pool: cfg.pool.clone().map(|p| crate::pool::Pool::new(&cfg.name, p)),
        }))
    }
}

/// A database entry whose files could not be loaded; the texts name the config key and file.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error(transparent)]
    Upstream(#[from] SettingsError),
    #[error(transparent)]
    ClientTls(#[from] ServerTlsError),
}

/// The configuration in force and its database entries, in config order.
pub(crate) struct Snapshot {
    pub(crate) config: Arc<Config>,
    pub(crate) databases: Vec<Arc<Database>>,
}

impl Snapshot {
    /// Builds every entry of `config`; all or nothing.
    pub(crate) fn build(config: Config) -> Result<Snapshot, EntryError> {
        let databases = config
            .databases
            .iter()
            .enumerate()
            .map(|(i, db)| Database::build(i, db))
            .collect::<Result<_, _>>()?;
        Ok(Snapshot {
            config: Arc::new(config),
            databases,
        })
    }

    pub(crate) fn database(&self, name: &str) -> Option<&Arc<Database>> {
        // A handful of entries: a scan beats hashing the name.
        self.databases.iter().find(|d| d.name == name)
    }
}

/// The published snapshot: read lock-free on every accept, replaced whole by a reload.
pub(crate) type Entries = Arc<ArcSwap<Snapshot>>;
