//! A real three-node OpenBao cluster with integrated (raft) storage on loopback, for the fleet
//! tests: static seal (auto-unseal, no unseal step), `retry_join` to every node, initialised
//! through node 0. [`RaftCluster::start`] returns once all three nodes are voters (a cluster
//! whose followers are still non-voters cannot elect a new leader when one is killed), and
//! [`RaftCluster::configure_like`] gives it the same database engine, JWT auth, policy and
//! roles as one [`TestApp`] of the shared dev server, so the app's JWT logs in to both.
//! `performance_multiplier = 1` (raft's own timeouts, as in development): the production
//! default of 5 makes an election after a kill take 5-15 s.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::process::{make_temp_dir, open_log, spawn_supervised, stop_child, wait_until};
use super::vault::{http_agent, vault_http};
use super::{bao_binary, free_port_pair, toml_str, TestApp, JWT_ISSUER};

pub struct RaftNode {
    pub addr: String,
    pub log: PathBuf,
    child: Option<Child>,
}

pub struct RaftCluster {
    pub nodes: Vec<RaftNode>,
    pub root_token: String,
    pub dir: PathBuf,
    agent: ureq::Agent,
}

impl RaftCluster {
    /// Starts three nodes and waits (up to 90 s) until the cluster has three voters.
    pub fn start() -> RaftCluster {
        let dir = make_temp_dir("dbward-raft-").expect("raft dir");
        let key = dir.join("seal.key");
        fs::write(&key, super::random_hex(16)).expect("seal key");
        let ports: Vec<u16> = (0..3).map(|_| free_port_pair()).collect();
        let bin = bao_binary().expect("bao");
        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let data = dir.join(format!("n{i}"));
            fs::create_dir_all(&data).unwrap();
            let joins: String = ports
                .iter()
                .map(|p| format!("  retry_join {{ leader_api_addr = \"http://127.0.0.1:{p}\" }}\n"))
                .collect();
            let hcl = format!(
                "storage \"raft\" {{\n  path = {data}\n  node_id = \"n{i}\"\n  performance_multiplier = 1\n{joins}}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  cluster_address = \"127.0.0.1:{c}\"\n  tls_disable = true\n}}\n\
                 seal \"static\" {{\n  current_key_id = \"k1\"\n  current_key = \"file://{key}\"\n}}\n\
                 api_addr = \"http://127.0.0.1:{port}\"\ncluster_addr = \"http://127.0.0.1:{c}\"\ndisable_mlock = true\n",
                data = toml_str(&data.to_string_lossy()),
                c = port + 1,
                key = key.display(),
            );
            let conf = dir.join(format!("n{i}.hcl"));
            fs::write(&conf, hcl).unwrap();
            let log = dir.join(format!("n{i}.log"));
            let (out, err) = open_log(&log).unwrap();
            let mut cmd = Command::new(&bin);
            cmd.arg("server")
                .arg(format!("-config={}", conf.display()))
                .env("HOME", &dir)
                .env_remove("BAO_ADDR")
                .env_remove("VAULT_ADDR")
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            let child = spawn_supervised(cmd, libc::SIGTERM).expect("spawn bao");
            nodes.push(RaftNode {
                addr: format!("http://127.0.0.1:{port}"),
                log,
                child: Some(child),
            });
        }
        let mut cluster = RaftCluster {
            nodes,
            root_token: String::new(),
            dir,
            agent: http_agent(),
        };
        let init = wait_until(
            Duration::from_secs(30),
            "raft node 0 accepts sys/init",
            || match cluster.request(
                0,
                "PUT",
                "sys/init",
                Some(&json!({"recovery_shares": 1, "recovery_threshold": 1})),
            ) {
                Ok((200, v)) => Ok(v),
                other => Err(format!("{other:?}")),
            },
        );
        cluster.root_token = init["root_token"].as_str().expect("root_token").to_string();
        // Autopilot promotes a joined node to voter once it has been healthy for the
        // stabilization time (10 s by default, and 10-30 s in all here); 2 s is plenty on loopback.
        wait_until(Duration::from_secs(30), "autopilot configuration", || {
            let leader = cluster.leader().ok_or("no active node")?;
            match cluster.request(
                leader,
                "POST",
                "sys/storage/raft/autopilot/configuration",
                Some(&json!({"server_stabilization_time": "2s"})),
            ) {
                Ok((200 | 204, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        wait_until(Duration::from_secs(90), "three raft voters", || {
            let leader = cluster.leader().ok_or("no active node")?;
            match cluster.request(leader, "GET", "sys/storage/raft/configuration", None) {
                Ok((200, v)) => {
                    let servers = v["data"]["config"]["servers"].as_array().cloned().unwrap_or_default();
                    let voters = servers.iter().filter(|s| s["voter"] == true).count();
                    if voters == 3 {
                        Ok(())
                    } else {
                        Err(format!("{voters} voters: {servers:?}"))
                    }
                }
                other => Err(format!("{other:?}")),
            }
        });
        cluster
    }

    /// A request to node `i` (`path` without `/v1/`), with the root token.
    pub fn request(&self, i: usize, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
        let token = (!self.root_token.is_empty()).then_some(self.root_token.as_str());
        vault_http(&self.agent, &self.nodes[i].addr, method, path, token, body)
    }

    /// The node whose `sys/health` says it is active (200), if any.
    pub fn leader(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i].child.is_some()
                && matches!(
                    vault_http(&self.agent, &self.nodes[i].addr, "GET", "sys/health", None, None),
                    Ok((200, _))
                )
        })
    }

    /// A write through the active node; panics unless 2xx.
    pub fn write(&self, path: &str, body: &Value) -> Value {
        let leader = self.leader().expect("an active node");
        let (status, v) = self.request(leader, "POST", path, Some(body)).expect("raft request");
        assert!((200..300).contains(&status), "raft write {path}: HTTP {status} {v}");
        v
    }

    /// SIGKILL of node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            stop_child(&mut c, libc::SIGKILL, Duration::from_secs(5));
        }
    }

    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// The dev server's configuration for `app`, on this cluster: the database engine and its
    /// connection, the app's dynamic role (`default_ttl`, `max_ttl`), JWT auth with the
    /// harness key, the app's policy and JWT role.
    pub fn configure_like(&self, app: &TestApp, default_ttl: &str, max_ttl: &str) {
        let s = app.servers;
        self.write("sys/mounts/database", &json!({"type": "database"}));
        self.write("sys/auth/jwt", &json!({"type": "jwt"}));
        self.write(
            "auth/jwt/config",
            &json!({"jwt_validation_pubkeys": [s.jwt_public_key_pem()], "bound_issuer": JWT_ISSUER}),
        );
        self.write(
            &format!("database/config/{}", app.dbname),
            &json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": format!(
                    "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/{}?sslmode=disable",
                    s.pg_port(), app.dbname
                ),
                "username": "postgres",
                "password": s.pg_superuser_password(),
                "allowed_roles": "*",
            }),
        );
        // The same role as the dev server's, with the TTLs the test asks for.
        let (_, role) = s.vault_read(&format!("database/roles/{}", app.dynamic_role));
        let mut role = role["data"].clone();
        role["default_ttl"] = json!(default_ttl);
        role["max_ttl"] = json!(max_ttl);
        self.write(&format!("database/roles/{}", app.dynamic_role), &role);
        self.write(
            &format!("sys/policies/acl/{}", app.policy),
            &json!({"policy": app.default_policy_hcl()}),
        );
        let (_, jwt_role) = s.vault_read(&format!("auth/jwt/role/{}", app.jwt_role));
        self.write(&format!("auth/jwt/role/{}", app.jwt_role), &jwt_role["data"]);
    }
}

impl Drop for RaftCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(mut c) = self.nodes[i].child.take() {
                stop_child(&mut c, libc::SIGKILL, Duration::from_secs(5));
            }
        }
        if std::env::var_os("DBWARD_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
