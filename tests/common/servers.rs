//! The servers one test binary shares: [`servers()`] starts Postgres and OpenBao once (both at
//! the same time), configures what every fixture needs, and hands out the disruption lock
//! ([`Servers::shared`] / [`Servers::exclusive`]). Their own methods live in `postgres.rs` and
//! `vault.rs`.

use std::fs;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use super::postgres::start_postgres_cluster;
use super::process::{keeper, make_temp_dir};
use super::vault::{http_agent, start_openbao};
use super::{TestApp, JWT_ISSUER, ROOT_TOKEN};

/// The servers of this test binary. Get it with [`servers()`].
pub struct Servers {
    /// Temp dir holding everything below; removed at exit.
    pub root: PathBuf,
    pub(super) startup: Duration,

    pub(super) pg_port: u16,
    pub(super) pg_data: PathBuf,
    pub(super) pg_log: PathBuf,
    pub(super) pg_password: String,
    pub(super) pg_owner: Option<(u32, u32)>,
    pub(super) pg: Mutex<Option<Child>>,

    pub(super) vault_addr: String,
    pub(super) bao_pid: i32,
    pub(super) bao_log: PathBuf,
    pub(super) audit_log: PathBuf,
    pub(super) bao: Mutex<Child>,
    pub(super) http: ureq::Agent,

    pub(super) jwt_key: jsonwebtoken::EncodingKey,
    pub(super) jwt_public_pem: String,

    /// Serialises CREATE DATABASE: concurrent copies of template1 can fail with "source
    /// database is being accessed by other users".
    pub(super) create_db: Mutex<()>,
    disruption: RwLock<()>,
}

static SERVERS: OnceLock<Result<Servers, String>> = OnceLock::new();

/// The servers of this test binary, started on first use (a few seconds), shared by all its
/// tests. Panics with the servers' logs if they cannot be started.
pub fn servers() -> &'static Servers {
    match SERVERS.get_or_init(Servers::start) {
        Ok(s) => s,
        Err(e) => panic!("test servers failed to start:\n{e}"),
    }
}

/// The opening of most tests: the servers, [`Servers::shared`] held, and a fresh app named
/// `tag`. Keep the guard bound for the whole test (`_g`, not `_`).
pub fn shared_app(tag: &str) -> (&'static Servers, RwLockReadGuard<'static, ()>, TestApp) {
    let s = servers();
    let guard = s.shared();
    (s, guard, s.new_app(tag))
}

impl Servers {
    fn start() -> Result<Servers, String> {
        let t0 = Instant::now();
        keeper(); // registers the atexit handler before the first child exists
        let root = make_temp_dir("dbward-test-").map_err(|e| format!("temp dir: {e}"))?;
        fs::create_dir(root.join("apps")).map_err(|e| e.to_string())?;

        // Start both at once: initdb is the slow part and needs no Vault.
        let (pg, bao) = thread::scope(|s| {
            let pg = s.spawn(|| start_postgres_cluster(&root));
            let bao = s.spawn(|| start_openbao(&root));
            (pg.join().unwrap(), bao.join().unwrap())
        });
        let pg = pg?;
        let bao = bao?;

        let key = rcgen::KeyPair::generate().map_err(|e| format!("generate JWT key: {e}"))?;
        let jwt_key = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())
            .map_err(|e| format!("JWT signing key: {e}"))?;

        let servers = Servers {
            root,
            startup: Duration::ZERO,
            pg_port: pg.port,
            pg_data: pg.data,
            pg_log: pg.log,
            pg_password: pg.password,
            pg_owner: pg.owner,
            pg: Mutex::new(Some(pg.child)),
            vault_addr: format!("http://127.0.0.1:{}", bao.port),
            bao_pid: bao.child.id() as i32,
            bao_log: bao.log,
            audit_log: bao.audit_log,
            bao: Mutex::new(bao.child),
            http: http_agent(),
            jwt_key,
            jwt_public_pem: key.public_key_pem(),
            create_db: Mutex::new(()),
            disruption: RwLock::new(()),
        };
        servers.configure_vault()?;
        eprintln!(
            "[harness] postgres 127.0.0.1:{}, OpenBao {}, ready in {:?}; logs in {} \
             (DBWARD_KEEP_TEST_DIRS=1 keeps them)",
            servers.pg_port,
            servers.vault_addr,
            t0.elapsed(),
            servers.root.display()
        );
        Ok(Servers {
            startup: t0.elapsed(),
            ..servers
        })
    }

    /// Mounts what every fixture uses (KV v2 at secret/ comes with dev mode).
    pub(super) fn configure_vault(&self) -> Result<(), String> {
        let steps = [
            ("sys/mounts/database", json!({"type": "database"})),
            ("sys/auth/jwt", json!({"type": "jwt"})),
            (
                "auth/jwt/config",
                json!({"jwt_validation_pubkeys": [self.jwt_public_pem], "bound_issuer": JWT_ISSUER}),
            ),
        ];
        for (path, body) in steps {
            let (status, resp) = self.try_vault_request("POST", path, Some(ROOT_TOKEN), Some(&body))?;
            if !(200..300).contains(&status) {
                return Err(format!("vault setup POST {path}: HTTP {status} {resp}"));
            }
        }
        Ok(())
    }

    /// Wall time from the first `servers()` call to everything configured.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Held by tests that must not overlap a restart/freeze of the shared servers.
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.disruption.read().unwrap_or_else(|e| e.into_inner())
    }
    /// Held by a test that restarts Postgres or freezes Vault.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.disruption.write().unwrap_or_else(|e| e.into_inner())
    }
}
