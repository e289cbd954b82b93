//! The upstream host list and its HA keys, as an operator writes them.

use std::time::Duration;

use super::*;

const ONE: &str = r#"
[vault]
address = "http://127.0.0.1:8200"
[vault.auth]
method = "token"
token_file = "/run/token"

[[databases]]
name = "payments"
listen = ["127.0.0.1:6432"]
upstream = "pg-a:5432"
[databases.credentials]
kind = "database"
role = "payments"
"#;

fn with(from: &str, to: &str) -> Result<Config, ConfigError> {
    Config::parse(&ONE.replacen(from, to, 1))
}

#[test]
fn one_host_keeps_working_and_gets_libpq_defaults() {
    let c = Config::parse(ONE).unwrap();
    let db = &c.databases[0];
    assert_eq!(db.upstream_hosts, std::slice::from_ref(&db.upstream));
    assert_eq!(db.ha, UpstreamHa::default());
    assert_eq!(db.ha.target_session_attrs, TargetSessionAttrs::Any);
    assert_eq!(db.ha.load_balance_hosts, LoadBalanceHosts::Disable);
    assert_eq!(
        db.ha.keepalive,
        Some(Keepalive {
            idle: Duration::from_secs(5),
            interval: Duration::from_secs(2),
            count: 3
        })
    );
    assert_eq!(db.ha.recheck_interval, None);
}

#[test]
fn a_list_is_kept_in_order() {
    let c = with(
        "upstream = \"pg-a:5432\"",
        "upstream = [\"pg-b:5433\", \"[::1]:5432\"]\ntarget_session_attrs = \"prefer-standby\"\nload_balance_hosts = \"random\"\nkeepalives = false\nrecheck_interval = \"30s\"",
    )
    .unwrap();
    let db = &c.databases[0];
    let hosts: Vec<String> = db.upstream_hosts.iter().map(|h| h.to_string()).collect();
    assert_eq!(hosts, ["pg-b:5433", "[::1]:5432"]);
    assert_eq!(db.upstream.to_string(), "pg-b:5433");
    assert_eq!(db.ha.target_session_attrs, TargetSessionAttrs::PreferStandby);
    assert_eq!(db.ha.load_balance_hosts, LoadBalanceHosts::Random);
    assert_eq!(db.ha.keepalive, None);
    assert_eq!(db.ha.recheck_interval, Some(Duration::from_secs(30)));
}

#[test]
fn bad_values_name_key_and_value() {
    let up = "upstream = \"pg-a:5432\"";
    let cases = [
        (up, "upstream = []", "databases[0].upstream: the list needs at least one host:port"),
        (up, "upstream = [\"pg-a:5432\", \"pg-b\"]", "databases[0].upstream[1]: \"pg-b\" is not host:port"),
        (up, "upstream = 5432", "databases[0].upstream: a \"host:port\" string or a list of them"),
        (
            up,
            "upstream = \"pg-a:5432\"\ntarget_session_attrs = \"master\"",
            "databases[0].target_session_attrs: unknown value \"master\", expected one of any, read-write, read-only, primary, standby, prefer-standby",
        ),
        (
            up,
            "upstream = \"pg-a:5432\"\nload_balance_hosts = \"yes\"",
            "databases[0].load_balance_hosts: unknown value \"yes\", expected one of disable, random",
        ),
        (up, "upstream = \"pg-a:5432\"\nkeepalives_count = 0", "databases[0].keepalives_count: must be at least 1"),
        (up, "upstream = \"pg-a:5432\"\nkeepalives_idle = \"100ms\"", "databases[0].keepalives_idle: 100ms is below"),
        (up, "upstream = \"pg-a:5432\"\nrecheck_interval = \"10ms\"", "databases[0].recheck_interval: 10ms is below the 1s minimum"),
    ];
    for (from, to, want) in cases {
        let e = with(from, to).unwrap_err().to_string();
        assert!(e.starts_with(want), "want {want:?}, got {e:?}");
    }
}
