//! [`HaPair`]: a Postgres 15 primary and a streaming replica of it (`pg_basebackup -R`), in their
//! own directories and on their own ports, apart from the shared cluster (so the shared one and
//! Vault's database engine never see a failover). The primary can be stopped as a crash would
//! stop it and the replica promoted.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use super::postgres::{pg_isready, spawn_postgres, start_postgres_cluster};
use super::process::{lock, start_server, stop_child};
use super::{free_port, output_text, pg_literal, psql_command, PG_BIN};

pub struct HaPair {
    pub primary_port: u16,
    pub replica_port: u16,
    pub password: String,
    primary: Mutex<Option<Child>>,
    replica: Mutex<Option<Child>>,
    replica_data: PathBuf,
    owner: Option<(u32, u32)>,
}

impl HaPair {
    /// A new primary under `root/pg`, role `user` with `password` on it (and so on the
    /// replica), then the replica under `root/replica`, streaming.
    pub fn start(root: &Path, user: &str, user_password: &str) -> HaPair {
        fs::create_dir_all(root).unwrap();
        let p = start_postgres_cluster(root).unwrap_or_else(|e| panic!("HA primary: {e}"));
        let pair_password = p.password.clone();
        let sql = format!("create role \"{user}\" login password {}", pg_literal(user_password));
        let out = psql_command()
            .args([
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &p.port.to_string(),
            ])
            .args(["-U", "postgres", "-d", "postgres", "-c", &sql])
            .env("PGPASSWORD", &pair_password)
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "create role on the HA primary: {}",
            output_text(&out)
        );

        let replica_data = root.join("replica");
        fs::DirBuilder::new().mode(0o700).create(&replica_data).unwrap();
        if let Some((uid, gid)) = p.owner {
            std::os::unix::fs::chown(&replica_data, Some(uid), Some(gid)).unwrap();
        }
        let mut backup = Command::new(Path::new(PG_BIN).join("pg_basebackup"));
        backup
            .args(["-h", "127.0.0.1", "-p", &p.port.to_string(), "-U", "postgres", "-D"])
            .arg(&replica_data)
            .args(["-R", "-X", "stream", "--no-sync"])
            .env("PGPASSWORD", &pair_password)
            .current_dir(root);
        if let Some((uid, gid)) = p.owner {
            backup.uid(uid).gid(gid);
        }
        let out = backup.output().expect("run pg_basebackup");
        assert!(out.status.success(), "pg_basebackup: {}", output_text(&out));

        let log = root.join("replica.log");
        let (replica, replica_port) = start_server(
            "postgres replica",
            &log,
            libc::SIGQUIT,
            free_port,
            |port| spawn_postgres(&replica_data, port, &log, p.owner).map_err(|e| format!("spawn replica: {e}")),
            pg_isready,
        )
        .unwrap_or_else(|e| panic!("HA replica: {e}"));
        let pair = HaPair {
            primary_port: p.port,
            replica_port,
            password: pair_password,
            primary: Mutex::new(Some(p.child)),
            replica: Mutex::new(Some(replica)),
            replica_data,
            owner: p.owner,
        };
        assert_eq!(pair.superuser_sql(replica_port, "select pg_is_in_recovery()"), "t");
        pair
    }

    /// Runs `sql` as the superuser on `port`; trimmed stdout, panics on failure.
    pub fn superuser_sql(&self, port: u16, sql: &str) -> String {
        let out = psql_command()
            .args([
                "-q",
                "-tA",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .env("PGPASSWORD", &self.password)
            .output()
            .expect("run psql");
        assert!(out.status.success(), "{sql} on port {port}: {}", output_text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `pg_ctl stop -m immediate`: SIGQUIT to the postmaster, which ends every backend at once.
    pub fn crash_primary(&self) {
        if let Some(mut c) = lock(&self.primary).take() {
            stop_child(&mut c, libc::SIGQUIT, Duration::from_secs(10));
        }
    }

    /// `pg_ctl -w promote` on the replica; returns once the promotion finished.
    pub fn promote_replica(&self) {
        let mut cmd = Command::new(Path::new(PG_BIN).join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.replica_data)
            .args(["-w", "-t", "30", "promote"]);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().expect("run pg_ctl promote");
        assert!(out.status.success(), "pg_ctl promote: {}", output_text(&out));
    }
}

impl Drop for HaPair {
    fn drop(&mut self) {
        for slot in [&self.primary, &self.replica] {
            if let Some(mut c) = lock(slot).take() {
                stop_child(&mut c, libc::SIGQUIT, Duration::from_secs(10));
            }
        }
    }
}
