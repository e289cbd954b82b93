//! The config file's error messages and defaults, as an operator sees them.

use super::*;

const GOOD: &str = r#"
[vault]
address = "http://127.0.0.1:8200"
[vault.auth]
method = "jwt"
role = "payments-service"
token_file = "/var/run/secrets/dbward/token"

[[databases]]
name = "payments"
listen = ["127.0.0.1:6432", "/run/dbward/.s.PGSQL.6432"]
upstream = "db.internal:5432"
[databases.credentials]
kind = "database"
role = "payments"
"#;

#[test]
fn good_config_gets_defaults() {
    let c = Config::parse(GOOD).unwrap();
    let db = &c.databases[0];
    assert_eq!(db.sslmode, SslMode::VerifyFull);
    assert_eq!(db.credentials.vault_path(), "database/creds/payments");
    assert_eq!(db.socket_mode, 0o660);
    assert_eq!(c.vault.auth.mount, "jwt");
    assert_eq!(c.vault.auth.token_check_interval, std::time::Duration::from_secs(60));
    assert_eq!(db.credentials.retire_margin, None, "the 10 %, at most 5 minutes, rule");
    let set = Config::parse(&GOOD.replacen("role = \"payments\"", "role = \"payments\"\nretire_margin = \"30s\"", 1))
        .unwrap();
    assert_eq!(
        set.databases[0].credentials.retire_margin,
        Some(std::time::Duration::from_secs(30))
    );
    assert_eq!(
        db.listen,
        [
            ListenAddr::Tcp("127.0.0.1:6432".parse().unwrap()),
            ListenAddr::Unix("/run/dbward/.s.PGSQL.6432".into())
        ]
    );
    assert_eq!(
        db.upstream,
        HostPort {
            host: "db.internal".into(),
            port: 5432
        }
    );
    assert_eq!(
        c.vault.auth.login,
        Login::Jwt {
            role: "payments-service".into(),
            token_file: "/var/run/secrets/dbward/token".into()
        }
    );
}

#[test]
fn unknown_enum_value_names_key_and_choices() {
    let bad = GOOD.replace("kind = \"database\"", "kind = \"kvv\"");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with("databases[0].credentials.kind: unknown value \"kvv\", expected one of database, static, kv"),
        "{e}"
    );
    assert!(e.contains("line 14"), "{e}");
}

#[test]
fn unknown_key_is_rejected_with_its_path() {
    let bad = GOOD.replace("role = \"payments\"", "role = \"payments\"\nrenew = true");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with("databases[0].credentials.renew: unknown field `renew`, expected one of `kind`"),
        "{e}"
    );
}

#[test]
fn remote_listener_needs_opt_in() {
    let bad = GOOD.replace("127.0.0.1:6432", "0.0.0.0:6432");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with("databases[0].listen[0]: \"0.0.0.0:6432\" is not a loopback address"),
        "{e}"
    );
    let ok = bad.replace("upstream =", "allow_remote_clients = true\nupstream =");
    Config::parse(&ok).unwrap();
}

#[test]
fn kv_path_must_be_the_api_path() {
    let kv = GOOD.replace(
        "kind = \"database\"\nrole = \"payments\"",
        "kind = \"kv\"\npath = \"secret/apps/payments/db\"",
    );
    let e = Config::parse(&kv).unwrap_err().to_string();
    assert!(
        e.starts_with("databases[0].credentials.path: \"secret/apps/payments/db\" is not a KV v2 API path"),
        "{e}"
    );
    let fixed = kv.replace("secret/apps", "secret/data/apps");
    let c = Config::parse(&fixed).unwrap();
    assert_eq!(c.databases[0].credentials.vault_path(), "secret/data/apps/payments/db");
}

#[test]
fn bad_values_name_key_and_value() {
    let cases = [
        ("upstream = \"db.internal:5432\"", "upstream = \"db.internal\"", "databases[0].upstream: \"db.internal\" is not host:port"),
        ("method = \"jwt\"", "method = \"ldap\"", "vault.auth.method: unknown value \"ldap\""),
        ("role = \"payments-service\"\n", "", "vault.auth.role: is required for method = \"jwt\""),
        ("address = \"http://127.0.0.1:8200\"", "address = \"127.0.0.1:8200\"", "vault.address: \"127.0.0.1:8200\" must start with http://"),
        ("name = \"payments\"", "name = \"payments\"\nconnect_timeout = \"soon\"", "databases[0].connect_timeout: invalid duration \"soon\""),
        ("role = \"payments-service\"\n", "role = \"payments-service\"\ntoken_check_interval = \"100ms\"\n", "vault.auth.token_check_interval: must be at least 1s"),
        ("name = \"payments\"", "name = \"payments\"\nsslmode = \"allow\"", "databases[0].sslmode: unknown value \"allow\", expected one of disable, prefer, require, verify-ca, verify-full"),
    ];
    for (from, to, want) in cases {
        let e = Config::parse(&GOOD.replacen(from, to, 1)).unwrap_err().to_string();
        assert!(e.starts_with(want), "want {want:?}, got {e:?}");
    }
}

#[test]
fn vault_address_is_one_url_or_a_list_of_nodes() {
    let one = Config::parse(GOOD).unwrap();
    assert_eq!(one.vault.addresses, ["http://127.0.0.1:8200"]);
    assert_eq!(one.vault.state_file, None);
    let list = GOOD.replacen(
        "address = \"http://127.0.0.1:8200\"",
        "address = [\"https://vault-0:8200/\", \"https://vault-1:8200\"]\nstate_file = \"/run/dbward/state\"",
        1,
    );
    let c = Config::parse(&list).unwrap();
    assert_eq!(c.vault.addresses, ["https://vault-0:8200", "https://vault-1:8200"]);
    assert_eq!(c.vault.address, "https://vault-0:8200");
    let plain = list.replacen("https://vault-1:8200", "http://vault-1:8200", 1);
    let e = Config::parse(&plain).unwrap_err().to_string();
    assert!(
        e.starts_with("vault.address[1]: \"http://vault-1:8200\" is http:// to a host that is not loopback"),
        "{e}"
    );
    assert_eq!(
        c.vault.state_file.as_deref(),
        Some(std::path::Path::new("/run/dbward/state"))
    );
    for (to, want) in [
        ("address = []", "vault.address: the list is empty"),
        (
            "address = 5",
            "vault.address: invalid type: integer `5`, expected a URL like \"https://vault:8200\" or a list of them",
        ),
        (
            "address = [\"http://a:8200\", \"vault-1:8200\"]",
            "vault.address[1]: \"vault-1:8200\" must start with http://",
        ),
        (
            "address = [\"http://a:8200\", \"http://a:8200/\"]",
            "vault.address[1]: \"http://a:8200/\" is listed twice",
        ),
    ] {
        let e = Config::parse(&GOOD.replacen("address = \"http://127.0.0.1:8200\"", to, 1))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "want {want:?}, got {e:?}");
    }
}

#[test]
fn duplicate_names_and_listeners_are_rejected() {
    let two = format!("{GOOD}\n{}", &GOOD[GOOD.find("[[databases]]").unwrap()..]);
    let e = Config::parse(&two).unwrap_err().to_string();
    assert!(
        e.starts_with("databases[1].name: \"payments\" is used by another"),
        "{e}"
    );
    let two = two
        .replacen("name = \"payments\"\nlisten", "name = \"orders\"\nlisten", 2)
        .replacen("name = \"orders\"", "name = \"payments\"", 1);
    let e = Config::parse(&two).unwrap_err().to_string();
    assert!(
        e.starts_with("databases[1].listen[0]: \"127.0.0.1:6432\" is also a listener of database \"payments\""),
        "{e}"
    );
}

#[test]
fn mounts_are_stored_as_vault_paths_spell_them() {
    let c =
        Config::parse(&GOOD.replace("method = \"jwt\"", "method = \"kubernetes\"\nmount = \"/k8s/prod/\"")).unwrap();
    assert_eq!(c.vault.auth.mount, "k8s/prod");
    assert_eq!(c.vault.auth.method(), AuthMethod::Kubernetes);
    let c =
        Config::parse(&GOOD.replace("role = \"payments\"\n", "role = \"payments\"\nmount = \"/db-prod/\"\n")).unwrap();
    assert_eq!(c.databases[0].credentials.vault_path(), "db-prod/creds/payments");
    assert_eq!(c.databases[0].credentials.source.mount(), Some("db-prod"));
}

#[test]
fn cert_file_and_key_file_go_together() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("c.pem");
    std::fs::write(&cert, "x").unwrap();
    let one = GOOD.replace(
        "upstream = \"db.internal:5432\"",
        &format!(
            "upstream = \"db.internal:5432\"\ncert_file = {:?}",
            cert.display().to_string()
        ),
    );
    let e = Config::parse(&one).unwrap_err().to_string();
    assert!(
        e.starts_with("databases[0].cert_file: cert_file and key_file go together"),
        "{e}"
    );
    let both = one.replace(
        "cert_file =",
        &format!("key_file = {:?}\ncert_file =", cert.display().to_string()),
    );
    let c = Config::parse(&both).unwrap();
    assert_eq!(
        c.databases[0].client_cert,
        Some(ClientCert {
            cert_file: cert.clone(),
            key_file: cert
        })
    );
}

#[test]
fn verify_ca_needs_a_ca_file() {
    let bad = GOOD.replacen("name = \"payments\"", "name = \"payments\"\nsslmode = \"verify-ca\"", 1);
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with("databases[0].ca_file: is required with sslmode = \"verify-ca\""),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "x").unwrap();
    let ok = bad.replacen(
        "sslmode = \"verify-ca\"",
        &format!("sslmode = \"verify-ca\"\nca_file = {:?}", ca.display().to_string()),
        1,
    );
    Config::parse(&ok).unwrap();
}

#[test]
fn http_vault_beyond_loopback_must_be_asked_for() {
    for loopback in [
        "http://127.0.0.1:8200",
        "http://localhost:8200",
        "http://[::1]:8200/",
        "http://127.0.0.2",
    ] {
        Config::parse(&GOOD.replacen("http://127.0.0.1:8200", loopback, 1))
            .unwrap_or_else(|e| panic!("{loopback}: {e}"));
    }
    for remote in [
        "http://vault.internal:8200",
        "http://10.0.0.5:8200",
        "http://127.0.0.1.example.com",
    ] {
        let text = GOOD.replacen("http://127.0.0.1:8200", remote, 1);
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "vault.address: \"{remote}\" is http:// to a host that is not loopback"
            )),
            "{e}"
        );
        assert!(e.contains("vault.allow_insecure_http = true"), "{e}");
        let allowed = text.replacen("[vault.auth]", "allow_insecure_http = true\n[vault.auth]", 1);
        Config::parse(&allowed).unwrap();
    }
    Config::parse(&GOOD.replacen("http://127.0.0.1:8200", "https://vault.internal:8200", 1)).unwrap();
}

#[test]
fn require_auth_and_channel_binding_follow_libpq() {
    use crate::upstream::auth_policy::ChannelBindingMode;
    let with = |lines: &str| GOOD.replacen("name = \"payments\"", &format!("name = \"payments\"\n{lines}"), 1);
    let c = Config::parse(GOOD).unwrap();
    assert!(!c.databases[0].require_auth.is_set());
    assert_eq!(c.databases[0].channel_binding, ChannelBindingMode::Prefer);
    let c = Config::parse(&with("require_auth = \"scram-sha-256\"\nchannel_binding = \"require\"")).unwrap();
    assert_eq!(c.databases[0].require_auth.to_string(), "scram-sha-256");
    assert_eq!(c.databases[0].channel_binding, ChannelBindingMode::Require);
    let cases = [
        (
            "require_auth = \"scram-sha-256,!md5\"",
            "databases[0].require_auth: \"scram-sha-256,!md5\": negative method \"!md5\" cannot be mixed",
        ),
        (
            "require_auth = \"kerberos\"",
            "databases[0].require_auth: \"kerberos\": unknown method \"kerberos\"",
        ),
        (
            "channel_binding = \"always\"",
            "databases[0].channel_binding: unknown value \"always\", expected one of disable, prefer, require",
        ),
        (
            "sslmode = \"disable\"\nchannel_binding = \"require\"",
            "databases[0].channel_binding: \"require\" needs TLS",
        ),
    ];
    for (lines, want) in cases {
        let e = Config::parse(&with(lines)).unwrap_err().to_string();
        assert!(e.starts_with(want), "want {want:?}, got {e:?}");
    }
}

#[test]
fn pool_is_off_unless_asked_for_and_gets_defaults() {
    assert_eq!(Config::parse(GOOD).unwrap().databases[0].pool, None);
    let on = Config::parse(&format!("{GOOD}[databases.pool]\n")).unwrap();
    assert_eq!(
        on.databases[0].pool,
        Some(PoolConfig {
            max_idle: 16,
            idle_timeout: std::time::Duration::from_secs(60),
            reset_query: "DISCARD ALL".into(),
        })
    );
    for (table, want) in [
        ("max_idle = 0", "databases[0].pool.max_idle: must be at least 1"),
        (
            "idle_timeout = \"0s\"",
            "databases[0].pool.idle_timeout: must be greater than zero",
        ),
        (
            "reset_query = \" \"",
            "databases[0].pool.reset_query: \" \" must be a non-empty SQL string",
        ),
        ("max_size = 3", "databases[0].pool"),
    ] {
        let e = Config::parse(&format!("{GOOD}[databases.pool]\n{table}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "want {want:?}, got {e:?}");
    }
}
