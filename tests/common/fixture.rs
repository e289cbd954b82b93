//! One test's slice of the shared servers: [`Servers::new_app`] creates a database, Postgres
//! roles, Vault database/KV/JWT configuration and a policy named after the test's tag, and
//! [`TestApp`] knows those names, changes them (policy, TTLs, JWT file, roles) and writes dbward
//! configs for them ([`TestApp::config`]).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::Output;

use serde_json::{json, Value};

use super::config::{Auth, Credentials, Entry, TestConfig};
use super::process::lock;
use super::{free_port, pg_ident, pg_literal, random_hex, sanitize_tag, Servers, JWT_AUDIENCE};

impl Servers {
    /// Creates everything one test needs, named after `tag` (unique per test binary; it is
    /// sanitised to `[a-z0-9_]`). See [`TestApp`].
    pub fn new_app(&'static self, tag: &str) -> TestApp {
        let t = sanitize_tag(tag);
        let dir = self.root.join("apps").join(&t);
        fs::DirBuilder::new().mode(0o755).create(&dir).unwrap_or_else(|e| {
            panic!(
                "new_app({tag:?}): {} ({e}); tags must be unique per binary",
                dir.display()
            )
        });
        let app = TestApp {
            servers: self,
            tag: t.clone(),
            dbname: t.clone(),
            owner_role: format!("{t}_owner"),
            dynamic_role: format!("{t}-dyn"),
            static_role: format!("{t}-static"),
            static_pg_role: format!("{t}_static"),
            kv_path: format!("secret/data/{t}/db"),
            kv_username: format!("{t}_kv"),
            kv_password: random_hex(16),
            policy: t.clone(),
            jwt_role: format!("{t}-svc"),
            jwt_subject: format!("system:serviceaccount:{t}"),
            jwt_path: dir.join("jwt"),
            dir,
        };

        // Postgres: the database is owned by a NOLOGIN group role; every login role the test
        // uses is a member, so all of them can use the same tables.
        let sql = format!(
            "CREATE ROLE {owner} NOLOGIN;\n\
             CREATE DATABASE {db} OWNER {owner};\n\
             CREATE ROLE {st} LOGIN PASSWORD {st_pw} IN ROLE {owner};\n\
             CREATE ROLE {kv} LOGIN PASSWORD {kv_pw} IN ROLE {owner};\n",
            owner = pg_ident(&app.owner_role),
            db = pg_ident(&app.dbname),
            st = pg_ident(&app.static_pg_role),
            st_pw = pg_literal(&random_hex(16)),
            kv = pg_ident(&app.kv_username),
            kv_pw = pg_literal(&app.kv_password),
        );
        {
            let _serial = lock(&self.create_db);
            self.pg_exec("postgres", &sql);
        }

        // Vault.
        self.vault_write(
            &format!("database/config/{t}"),
            &json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": format!(
                    "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/{}?sslmode=disable",
                    self.pg_port, app.dbname
                ),
                "username": "postgres",
                "password": self.pg_password,
                "allowed_roles": "*",
            }),
        );
        app.create_dynamic_role(&app.dynamic_role, "1h", "2h");
        self.vault_write(
            &format!("database/static-roles/{}", app.static_role),
            &json!({"db_name": app.dbname, "username": app.static_pg_role, "rotation_period": "1h"}),
        );
        app.write_kv(&app.kv_username, &app.kv_password);
        app.set_policy(&app.default_policy_hcl());
        app.set_jwt_role_ttls("1h", None);
        app.write_jwt(&app.jwt_subject, JWT_AUDIENCE, 3600);
        app
    }
}

/// One test's slice of the shared servers. All names derive from the sanitised tag `t`:
///
/// | what | name |
/// | --- | --- |
/// | Postgres database, owned by NOLOGIN role `t_owner` | `t` |
/// | Vault database connection | `database/config/t` |
/// | dynamic role (1h/2h), users are members of `t_owner` | `t-dyn` → `database/creds/t-dyn` |
/// | static role for LOGIN role `t_static` (rotation 1h) | `t-static` → `database/static-creds/t-static` |
/// | KV v2 secret for LOGIN role `t_kv` | `secret/data/t/db` |
/// | policy (read the three, update sys/leases/renew and revoke) | `t` |
/// | jwt role, `sub` = `system:serviceaccount:t`, `aud` = `vault` | `t-svc` |
///
/// Objects that a dynamic user creates belong to that user, and Vault cannot drop a role that
/// owns objects: create tables with `SET ROLE t_owner` (or via [`TestApp::pg_exec`]).
pub struct TestApp {
    pub servers: &'static Servers,
    pub tag: String,
    pub dbname: String,
    pub owner_role: String,
    /// Vault role names.
    pub dynamic_role: String,
    pub static_role: String,
    /// The Postgres LOGIN role behind the static role.
    pub static_pg_role: String,
    /// KV v2 API path, as a policy and the dbward config name it.
    pub kv_path: String,
    pub kv_username: String,
    pub kv_password: String,
    pub policy: String,
    pub jwt_role: String,
    pub jwt_subject: String,
    /// The workload JWT file (valid for 1h at creation).
    pub jwt_path: PathBuf,
    /// A directory of this test's own (for configs, sockets, ...).
    pub dir: PathBuf,
}

impl TestApp {
    /// Rewrites the JWT file (atomically: dbward may read it at any moment).
    pub fn write_jwt(&self, sub: &str, aud: &str, exp_offset_secs: i64) {
        let jwt = self.servers.make_jwt(sub, aud, exp_offset_secs);
        let tmp = self.jwt_path.with_extension("tmp");
        fs::write(&tmp, jwt).expect("write JWT");
        fs::rename(&tmp, &self.jwt_path).expect("rename JWT into place");
    }

    /// The JWT currently in the file.
    pub fn jwt(&self) -> String {
        fs::read_to_string(&self.jwt_path).expect("read JWT")
    }

    /// Logs in with the current JWT file; returns the client token (panics on failure).
    pub fn login(&self) -> String {
        let (status, resp) = self.servers.vault_login_jwt(&self.jwt_role, &self.jwt());
        assert_eq!(status, 200, "jwt login as {}: {resp}", self.jwt_role);
        resp["auth"]["client_token"]
            .as_str()
            .expect("auth.client_token")
            .to_string()
    }

    /// The policy `new_app` installs.
    pub fn default_policy_hcl(&self) -> String {
        format!(
            "path \"database/creds/{}\" {{ capabilities = [\"read\"] }}\n\
             path \"database/static-creds/{}\" {{ capabilities = [\"read\"] }}\n\
             path \"{}\" {{ capabilities = [\"read\"] }}\n\
             path \"sys/leases/renew\" {{ capabilities = [\"update\"] }}\n\
             path \"sys/leases/revoke\" {{ capabilities = [\"update\"] }}\n",
            self.dynamic_role, self.static_role, self.kv_path
        )
    }

    /// (Re)writes the app's jwt role: bound to its subject and the `vault` audience, issuing
    /// tokens with its policy, `token_ttl` and (optionally) `token_max_ttl`.
    pub fn set_jwt_role_ttls(&self, token_ttl: &str, token_max_ttl: Option<&str>) {
        let mut role = json!({
            "role_type": "jwt",
            "bound_audiences": [JWT_AUDIENCE],
            "user_claim": "sub",
            "bound_subject": self.jwt_subject,
            "token_policies": [self.policy],
            "token_ttl": token_ttl,
        });
        if let Some(max) = token_max_ttl {
            role["token_max_ttl"] = json!(max);
        }
        self.servers
            .vault_write(&format!("auth/jwt/role/{}", self.jwt_role), &role);
    }

    /// Replaces this app's policy (takes effect for existing tokens at once). An empty `hcl`
    /// grants nothing (Vault refuses an empty policy text, so a comment stands in for it).
    pub fn set_policy(&self, hcl: &str) {
        let hcl = if hcl.trim().is_empty() {
            "# grants nothing\n"
        } else {
            hcl
        };
        self.servers
            .vault_write(&format!("sys/policies/acl/{}", self.policy), &json!({"policy": hcl}));
    }

    /// Creates (or replaces) a dynamic role on this app's database whose users are members of
    /// `<tag>_owner`. TTLs are Vault durations (`"6s"`, `"1h"`).
    pub fn create_dynamic_role(&self, name: &str, default_ttl: &str, max_ttl: &str) {
        self.servers.vault_write(
            &format!("database/roles/{name}"),
            &json!({
                "db_name": self.dbname,
                "default_ttl": default_ttl,
                "max_ttl": max_ttl,
                "creation_statements": [
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
                    format!("GRANT {} TO \"{{{{name}}}}\";", pg_ident(&self.owner_role)),
                ],
            }),
        );
    }

    /// A second dynamic role, `<tag>-short`, with these TTLs, which the app's policy may read
    /// too; returns its name.
    pub fn short_dynamic_role(&self, default_ttl: &str, max_ttl: &str) -> String {
        let role = format!("{}-short", self.tag);
        self.create_dynamic_role(&role, default_ttl, max_ttl);
        self.set_policy(&format!(
            "{}path \"database/creds/{role}\" {{ capabilities = [\"read\"] }}\n",
            self.default_policy_hcl()
        ));
        role
    }

    /// Copies the KV secret to `<kv_path>-v2` without touching the policy, as when a secret
    /// is moved; returns the new path.
    pub fn move_kv_secret(&self) -> String {
        let new_path = format!("{}-v2", self.kv_path);
        self.servers.vault_write(
            &new_path,
            &json!({"data": {"username": self.kv_username, "password": self.kv_password}}),
        );
        new_path
    }

    /// Creates the table `definition` (`name(columns)`) in this app's database, owned by
    /// `<tag>_owner` so that every login role of the app may use it.
    pub fn create_table(&self, definition: &str) {
        let name = definition.split('(').next().unwrap().trim();
        self.pg_exec(&format!(
            "create table {definition}; alter table {name} owner to {}",
            pg_ident(&self.owner_role)
        ));
    }

    /// Writes the KV secret (a new version). Does not touch the Postgres role's password.
    pub fn write_kv(&self, username: &str, password: &str) {
        self.servers.vault_write(
            &self.kv_path,
            &json!({"data": {"username": username, "password": password}}),
        );
    }

    /// Rotates the static role's password now.
    pub fn rotate_static_role(&self) {
        self.servers
            .vault_write(&format!("database/rotate-role/{}", self.static_role), &json!({}));
    }

    /// Reads credentials with the root token: `(username, password, whole response)`.
    /// `kind` is "database", "static" or "kv".
    pub fn read_creds(&self, kind: &str) -> (String, String, Value) {
        let path = match kind {
            "database" => format!("database/creds/{}", self.dynamic_role),
            "static" => format!("database/static-creds/{}", self.static_role),
            "kv" => self.kv_path.clone(),
            other => panic!("unknown credential kind {other:?}"),
        };
        let (status, resp) = self.servers.vault_read(&path);
        assert_eq!(status, 200, "read {path}: {resp}");
        let data = if kind == "kv" {
            &resp["data"]["data"]
        } else {
            &resp["data"]
        };
        let user = data["username"].as_str().expect("username").to_string();
        let pass = data["password"].as_str().expect("password").to_string();
        (user, pass, resp)
    }

    pub fn vault_write(&self, path: &str, body: &Value) -> Value {
        self.servers.vault_write(path, body)
    }
    pub fn vault_read(&self, path: &str) -> (u16, Value) {
        self.servers.vault_read(path)
    }
    pub fn vault_delete(&self, path: &str) {
        self.servers.vault_delete(path)
    }

    /// Runs SQL as the superuser in this app's database; panics on failure; returns stdout.
    pub fn pg_exec(&self, sql: &str) -> String {
        self.servers.pg_exec(&self.dbname, sql)
    }
    /// Runs SQL as the superuser in this app's database; returns psql's output as is.
    pub fn psql_as_superuser(&self, sql: &str) -> Output {
        self.servers.psql_superuser(&self.dbname, sql)
    }
    pub async fn connect_superuser(&self) -> tokio_postgres::Client {
        self.servers.connect_superuser(&self.dbname).await
    }

    /// The credentials of `kind` for this app: "database" → `<tag>-dyn`, "static" →
    /// `<tag>-static`, "kv" → the KV path.
    pub fn credentials(&self, kind: &str) -> Credentials {
        match kind {
            "database" => Credentials::database(&self.dynamic_role),
            "static" => Credentials::static_role(&self.static_role),
            "kv" => Credentials::kv(&self.kv_path),
            other => panic!("unknown credential kind {other:?}: use database, static or kv"),
        }
    }

    /// A `[[databases]]` entry named `name` with [`Self::credentials`] of `kind`, listening on a
    /// fresh 127.0.0.1 port, upstream the test Postgres without TLS, forcing dbname `<tag>`.
    pub fn entry(&self, name: &str, kind: &str) -> Entry {
        Entry {
            name: name.to_string(),
            listen: vec![format!("127.0.0.1:{}", free_port())],
            upstream: format!("127.0.0.1:{}", self.servers.pg_port()),
            dbname: Some(self.dbname.clone()),
            sslmode: Some("disable".into()),
            extra: Vec::new(),
            credentials: self.credentials(kind),
        }
    }

    /// A dbward config for this app: the test Vault, JWT login as `<tag>-svc` with the app's
    /// JWT file, and one entry ([`Self::entry`]) named `<tag>`.
    pub fn config(&self, kind: &str) -> TestConfig {
        TestConfig {
            vault_address: self.servers.vault_addr().to_string(),
            vault_ca_file: None,
            vault_lines: Vec::new(),
            auth: Auth::new(
                "jwt",
                &[
                    ("role", &self.jwt_role),
                    ("token_file", &self.jwt_path.to_string_lossy()),
                ],
            ),
            databases: vec![self.entry(&self.tag, kind)],
            admin: None,
            proxy: Vec::new(),
        }
    }
}
