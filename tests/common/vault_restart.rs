//! All of Vault restarted with its state lost: the shared dev server killed and started again
//! on the same port (dev mode keeps everything in memory), then given the harness's mounts and
//! one app's configuration again, as an operator re-provisioning it would. The new process's
//! pid is not tracked: [`Servers::freeze_vault`] is not for use after this.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use super::process::{lock, open_log, spawn_supervised, stop_child, wait_server_ready};
use super::vault::{bao_binary, vault_http};
use super::{Servers, TestApp, JWT_AUDIENCE, ROOT_TOKEN};

impl Servers {
    /// SIGKILL of the dev server, a new one on the same port with the same config file, and
    /// the harness's mounts again. Take [`Servers::exclusive`] first.
    pub fn restart_vault_losing_state(&self) {
        let mut child = lock(&self.bao);
        stop_child(&mut child, libc::SIGKILL, Duration::from_secs(5));
        let port = self.vault_addr.rsplit_once(':').unwrap().1.to_string();
        let (out, err) = open_log(&self.bao_log).expect("bao log");
        let mut cmd = Command::new(bao_binary().expect("bao"));
        cmd.args(["server", "-dev", "-dev-root-token-id=root"])
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .arg(format!("-config={}", self.root.join("bao.hcl").display()))
            .env("HOME", &self.root)
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        *child = spawn_supervised(cmd, libc::SIGTERM).expect("spawn bao");
        wait_server_ready(&mut child, "OpenBao (restarted)", &self.bao_log, || {
            Ok(matches!(
                vault_http(&self.http, &self.vault_addr, "GET", "sys/mounts", Some(ROOT_TOKEN), None),
                Ok((200, ref m)) if m.get("secret/").is_some() || m["data"].get("secret/").is_some()
            ))
        })
        .expect("OpenBao restarts");
        drop(child);
        self.configure_vault().expect("configure the restarted OpenBao");
    }
}

impl TestApp {
    /// What `new_app` configured in Vault for this app, again (on a Vault that lost it).
    pub fn configure_vault_again(&self, dynamic_default_ttl: &str, dynamic_max_ttl: &str) {
        let s = self.servers;
        s.vault_write(
            &format!("database/config/{}", self.tag),
            &json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": format!(
                    "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/{}?sslmode=disable",
                    s.pg_port, self.dbname
                ),
                "username": "postgres",
                "password": s.pg_password,
                "allowed_roles": "*",
            }),
        );
        self.create_dynamic_role(&self.dynamic_role, dynamic_default_ttl, dynamic_max_ttl);
        self.set_policy(&self.default_policy_hcl());
        self.set_jwt_role_ttls("1h", None);
        self.write_jwt(&self.jwt_subject, JWT_AUDIENCE, 3600);
    }
}
