//! The one way tests write a dbward config: [`TestConfig`] holds the tables of a `dbward.toml`
//! as plain fields. [`TestApp::config`](super::TestApp::config) fills them with the harness's
//! defaults, a test changes what it is about (a field, a line, another entry), and
//! [`TestConfig::toml`] renders the file. [`Dbward`](super::Dbward) starts from one.

use super::{free_port, toml_str};

/// A whole `dbward.toml`.
#[derive(Clone, Debug)]
pub struct TestConfig {
    /// `vault.address`
    pub vault_address: String,
    /// `vault.ca_file`
    pub vault_ca_file: Option<String>,
    /// More `[vault]` lines, as TOML (`state_file = "..."`); a line `address = [...]` replaces
    /// `vault_address`.
    pub vault_lines: Vec<String>,
    /// `[vault.auth]`
    pub auth: Auth,
    /// `[[databases]]`, in order.
    pub databases: Vec<Entry>,
    /// `admin.listen`
    pub admin: Option<String>,
    /// `[proxy]`: key and (string) value, in order.
    pub proxy: Vec<(String, String)>,
}

/// `[vault.auth]`: the method and its settings, all strings.
#[derive(Clone, Debug)]
pub struct Auth {
    pub method: String,
    pub settings: Vec<(String, String)>,
}

/// `[databases.credentials]`: the kind and its settings, all strings.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub kind: String,
    pub settings: Vec<(String, String)>,
}

/// One `[[databases]]` entry.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    /// TCP `host:port` or socket paths.
    pub listen: Vec<String>,
    pub upstream: String,
    /// `None` leaves the key out: the client's database name is used.
    pub dbname: Option<String>,
    /// `None` leaves the key out.
    pub sslmode: Option<String>,
    /// Further lines of the table, as TOML (`max_client_connections = 1`).
    pub extra: Vec<String>,
    pub credentials: Credentials,
}

fn pairs(settings: &[(&str, &str)]) -> Vec<(String, String)> {
    settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn render_pairs(out: &mut String, settings: &[(String, String)]) {
    for (k, v) in settings {
        out.push_str(&format!("{k} = {}\n", toml_str(v)));
    }
}

impl Auth {
    pub fn new(method: &str, settings: &[(&str, &str)]) -> Auth {
        Auth {
            method: method.to_string(),
            settings: pairs(settings),
        }
    }
}

impl Credentials {
    pub fn new(kind: &str, settings: &[(&str, &str)]) -> Credentials {
        Credentials {
            kind: kind.to_string(),
            settings: pairs(settings),
        }
    }
    /// Dynamic credentials of database role `role`.
    pub fn database(role: &str) -> Credentials {
        Credentials::new("database", &[("role", role)])
    }
    /// The static database role `role`.
    pub fn static_role(role: &str) -> Credentials {
        Credentials::new("static", &[("role", role)])
    }
    /// Username and password from the KV v2 secret at `path`.
    pub fn kv(path: &str) -> Credentials {
        Credentials::new("kv", &[("path", path)])
    }
}

/// The port of the first TCP address among `addrs`.
fn first_port<'a>(addrs: impl IntoIterator<Item = &'a String>) -> Option<u16> {
    addrs
        .into_iter()
        .find_map(|a| a.strip_prefix("127.0.0.1:").and_then(|p| p.parse().ok()))
}

impl Entry {
    /// Replaces the listen addresses.
    pub fn listen(mut self, addrs: &[impl AsRef<str>]) -> Entry {
        self.listen = addrs.iter().map(|a| a.as_ref().to_string()).collect();
        self
    }
    /// Adds a line (TOML) to the table.
    pub fn line(mut self, line: &str) -> Entry {
        self.extra.push(line.to_string());
        self
    }
    /// The first 127.0.0.1 listen port.
    pub fn port(&self) -> u16 {
        first_port(&self.listen).unwrap_or_else(|| panic!("entry {} has no TCP listener", self.name))
    }

    fn render(&self, out: &mut String) {
        let listen: Vec<String> = self.listen.iter().map(|l| toml_str(l)).collect();
        out.push_str(&format!(
            "\n[[databases]]\nname = {}\nlisten = [{}]\nupstream = {}\n",
            toml_str(&self.name),
            listen.join(", "),
            // A TOML list of host:port strings as it is (IPv6 hosts start with `[` but not `["`).
            if self.upstream.starts_with("[\"") {
                self.upstream.clone()
            } else {
                toml_str(&self.upstream)
            }
        ));
        if let Some(db) = &self.dbname {
            out.push_str(&format!("dbname = {}\n", toml_str(db)));
        }
        if let Some(mode) = &self.sslmode {
            out.push_str(&format!("sslmode = {}\n", toml_str(mode)));
        }
        for l in &self.extra {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str(&format!(
            "\n[databases.credentials]\nkind = {}\n",
            toml_str(&self.credentials.kind)
        ));
        render_pairs(out, &self.credentials.settings);
    }
}

impl TestConfig {
    /// The file's text.
    pub fn toml(&self) -> String {
        let mut out = String::from("[vault]\n");
        if !self.vault_lines.iter().any(|l| l.starts_with("address")) {
            out.push_str(&format!("address = {}\n", toml_str(&self.vault_address)));
        }
        for line in &self.vault_lines {
            out.push_str(&format!("{line}\n"));
        }
        if let Some(ca) = &self.vault_ca_file {
            out.push_str(&format!("ca_file = {}\n", toml_str(ca)));
        }
        out.push_str(&format!("\n[vault.auth]\nmethod = {}\n", toml_str(&self.auth.method)));
        render_pairs(&mut out, &self.auth.settings);
        for db in &self.databases {
            db.render(&mut out);
        }
        if let Some(admin) = &self.admin {
            out.push_str(&format!("\n[admin]\nlisten = {}\n", toml_str(admin)));
        }
        if !self.proxy.is_empty() {
            out.push_str("\n[proxy]\n");
            render_pairs(&mut out, &self.proxy);
        }
        out
    }

    /// Replaces the first entry's listen addresses.
    pub fn listen(mut self, addrs: &[impl AsRef<str>]) -> TestConfig {
        let first = self.databases.remove(0);
        self.databases.insert(0, first.listen(addrs));
        self
    }
    /// Adds a line (TOML) to the first entry.
    pub fn db_line(mut self, line: &str) -> TestConfig {
        self.databases[0].extra.push(line.to_string());
        self
    }
    /// Adds a line (TOML) to `[vault]`.
    pub fn vault_line(mut self, line: &str) -> TestConfig {
        self.vault_lines.push(line.to_string());
        self
    }
    /// Adds an entry.
    pub fn entry(mut self, entry: Entry) -> TestConfig {
        self.databases.push(entry);
        self
    }
    /// An admin listener on a fresh 127.0.0.1 port.
    pub fn with_admin(mut self) -> TestConfig {
        self.admin = Some(format!("127.0.0.1:{}", free_port()));
        self
    }
    /// Sets `[proxy]` `key` to the string `value`.
    pub fn proxy(mut self, key: &str, value: &str) -> TestConfig {
        self.proxy.push((key.to_string(), value.to_string()));
        self
    }

    /// The first entry's first 127.0.0.1 listen port.
    pub fn port(&self) -> u16 {
        self.databases[0].port()
    }
    /// The admin listener's port.
    pub fn admin_port(&self) -> u16 {
        first_port(&self.admin).expect("no admin listener on 127.0.0.1")
    }
    /// Every listen address: the entries' and the admin's.
    pub fn listen_addrs(&self) -> Vec<String> {
        let mut out: Vec<String> = self.databases.iter().flat_map(|d| d.listen.clone()).collect();
        out.extend(self.admin.clone());
        out
    }
}
