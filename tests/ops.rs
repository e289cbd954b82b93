//! Operations, end to end: the admin endpoints, metrics scraped by a real Prometheus, promtool
//! on the live exposition and on the alert rules, the Grafana dashboard's queries against what
//! dbward really exports, the systemd units, graceful shutdown with live sessions, and JSON logs
//! without secrets. Real OpenBao and Postgres (tests/common), the real dbward binary.
//!
//! Prometheus and promtool come from Debian's `prometheus` package; systemd-analyze from
//! systemd. Tests that need a tool which is absent say so and pass: they cannot fail for a
//! reason that has nothing to do with dbward.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

/// GET on the admin server: (status, body, content type). Never panics on 4xx/5xx.
fn admin_get(port: u16, path: &str) -> Result<(u16, String, String), String> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let resp = match agent.get(&format!("http://127.0.0.1:{port}{path}")).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.status();
    let ctype = resp.header("content-type").unwrap_or_default().to_string();
    let body = resp.into_string().map_err(|e| e.to_string())?;
    Ok((status, body, ctype))
}

fn scrape(admin: u16) -> String {
    let (status, body, _) = admin_get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits (up to 60 s) until Prometheus answers `query` with `want`.
async fn wait_for_scalar(prom: &std::sync::Arc<Prometheus>, query: String, want: f64, what: &'static str) {
    let p = prom.clone();
    wait_until_async(Duration::from_secs(60), what, move || match p.scalar(&query) {
        Ok(v) if v == want => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
}

/// Metric families in a text exposition: name → type.
fn families(exposition: &str) -> HashMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_string(), t.trim().to_string()))
        .collect()
}

/// Sample names (with `_bucket`/`_sum`/`_count`) in a text exposition.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect()
}

/// The value of the first sample of `name` whose labels include all of `labels`.
fn sample_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return None;
        }
        value.parse().ok()
    })
}

/// Every `dbward_*` metric name a PromQL expression mentions (an identifier starting with
/// `dbward_` that is not inside a quoted string).
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if c == b'"' || c == b'\'' || c == b'`' {
            quote = Some(c);
            i += 1;
            continue;
        }
        if expr[i..].starts_with("dbward_") && (i == 0 || !ident(b[i - 1])) {
            let end = (i..b.len()).find(|&j| !ident(b[j])).unwrap_or(b.len());
            out.insert(expr[i..end].to_string());
            i = end;
            continue;
        }
        i += 1;
    }
    out
}

/// Whether `name` (possibly `x_bucket`, `x_sum`, `x_count` of a histogram `x`) is exported.
fn is_exported(name: &str, names: &BTreeSet<String>, types: &HashMap<String, String>) -> bool {
    if names.contains(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|base| types.get(base).is_some_and(|t| t == "histogram" || t == "summary"))
    })
}

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", Value::String(s)) | ("definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let path = Path::new(REPO).join("dashboards/dbward.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dash: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    walk(&dash, &mut out);
    out
}

/// Every alert expression of dashboards/dbward-alerts.yml (the `expr:` values; block scalars
/// included). A small reader for this one file's shape rather than a YAML dependency.
fn alert_exprs() -> Vec<String> {
    let text = fs::read_to_string(Path::new(REPO).join("dashboards/dbward-alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((indent, rest)) = line.split_once("expr:") else {
            continue;
        };
        if !indent.trim().is_empty() {
            continue;
        }
        let rest = rest.trim();
        if rest == "|" || rest == ">" {
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                if next.len() - next.trim_start().len() <= indent.len() && !next.trim().is_empty() {
                    break;
                }
                block.push_str(next.trim());
                block.push(' ');
                lines.next();
            }
            out.push(block);
        } else {
            out.push(rest.to_string());
        }
    }
    out
}

/// Whether `tool` can run here. A missing tool fails the test (a test that passes without the
/// real tool proves nothing) unless DBWARD_SKIP_EXTRAS=1 asks to skip, as scripts/test does
/// when it was told not to install PgBouncer and Prometheus.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found && std::env::var("DBWARD_SKIP_EXTRAS").as_deref() != Ok("1") {
        panic!("{tool} is not installed: scripts/test installs it (or set DBWARD_SKIP_EXTRAS=1 to skip)");
    }
    found
}

/// A Prometheus server scraping one dbward admin endpoint every second. Killed on drop.
struct Prometheus {
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _child: ChildGuard,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: dbward\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("prometheus.log");
        let out = fs::File::create(&log).unwrap();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = ChildGuard::spawn(cmd).expect("spawn prometheus");
        let p = Prometheus {
            port,
            log,
            _dir: dir,
            _child: child,
        };
        wait_until(Duration::from_secs(60), "prometheus ready", || {
            let r = ureq::get(&format!("http://127.0.0.1:{port}/-/ready")).call();
            match r {
                Ok(r) if r.status() == 200 => Ok(()),
                other => Err(format!("{:?}\n{}", other.map(|r| r.status()), log_tail(&p.log, 20))),
            }
        });
        p
    }

    /// An instant query: the `data` of the answer, or the error Prometheus gave.
    fn query(&self, q: &str) -> Result<Value, String> {
        let r = ureq::get(&format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query("query", q)
            .call();
        let body: Value = match r {
            Ok(r) => serde_json::from_str(&r.into_string().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?,
            Err(ureq::Error::Status(_, r)) => {
                serde_json::from_str(&r.into_string().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        if body["status"] != "success" {
            return Err(format!("query {q:?}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// The single value of a vector query, if it has exactly one sample.
    fn scalar(&self, q: &str) -> Result<f64, String> {
        let data = self.query(q)?;
        let result = data["result"].as_array().ok_or(format!("{data}"))?;
        match result.as_slice() {
            [one] => one["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{data}")),
            _ => Err(format!("{q}: {} samples: {data}", result.len())),
        }
    }
}

/// Opens a session through dbward, keeping the connection task's outcome: a FATAL the server
/// sends while the session is idle (57P01 at shutdown) ends it with that error.
async fn connect_watched(
    port: u16,
    dbname: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = pg_config(port, dbname, "app")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through dbward");
    (client, tokio::spawn(connection))
}

/// Starts dbward with three entries that between them make every metric the dashboard and
/// the alerts use appear: `<tag>` (working, 6 s leases so that a refresh, a renewal and a
/// revocation happen within seconds), `<tag>_down` (nothing listens upstream) and
/// `<tag>_denied` (a Vault role the policy does not grant). Returns dbward, the admin port and
/// an open session on `<tag>` (keep it: it makes the active-connections gauge 1).
async fn exercise_everything(app: &TestApp) -> (Dbward, u16, tokio_postgres::Client) {
    app.create_dynamic_role(&app.dynamic_role, "6s", "1m");
    let mut down = app
        .entry(&format!("{}_down", app.tag), "database")
        .line("connect_timeout = \"2s\"");
    down.dbname = None;
    down.upstream = format!("127.0.0.1:{}", free_port());
    let mut denied = app.entry(&format!("{}_denied", app.tag), "database");
    denied.dbname = None;
    denied.credentials = Credentials::database(&format!("{}-not-granted", app.tag));
    let cfg = app.config("database").with_admin().entry(down).entry(denied);
    let (port, admin) = (cfg.port(), cfg.admin_port());
    let (down_port, denied_port) = (cfg.databases[1].port(), cfg.databases[2].port());
    let d = Dbward::start(&cfg);

    // Bytes are counted when a session ends: end one.
    let short = connect(port, &app.dbname, "app").await;
    short.simple_query("select 1").await.expect("query through dbward");
    drop(short);
    let client = connect(port, &app.dbname, "app").await;
    client.simple_query("select 1").await.expect("query through dbward");
    client
        .cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send a cancel request");
    let down = connect_refused(down_port, &app.dbname, "app").await;
    assert!(down.code().code().starts_with("08"), "{down}");
    let denied = connect_refused(denied_port, &app.dbname, "app").await;
    assert_eq!(denied.code().code(), "28000", "{denied}");

    // The open session's lease is renewed once replaced; the next, unused one is revoked.
    wait_until_async(Duration::from_secs(40), "lease renewal and revocation", move || {
        let m = scrape(admin);
        let names = sample_names(&m);
        if names.contains("dbward_lease_renewals_total")
            && names.contains("dbward_lease_revocations_total")
            && names.contains("dbward_cancel_requests_total")
            && names.contains("dbward_relayed_bytes_total")
        {
            Ok(())
        } else {
            Err(m)
        }
    })
    .await;
    (d, admin, client)
}

// ---------------------------------------------------------------------------------------------
// Admin endpoints.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_readiness_and_startup() {
    let s = servers();
    let app = s.new_app("ops_admin");
    let cfg = app.config("database").with_admin();
    let (port, admin) = (cfg.port(), cfg.admin_port());
    let _d = Dbward::start(&cfg);

    let (status, body, _) = admin_get(admin, "/healthz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body, _) = wait_until(Duration::from_secs(20), "/startupz 200", || {
        let r = admin_get(admin, "/startupz")?;
        if r.0 == 200 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = admin_get(admin, "/readyz").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!(
            "{}: ready (credential 1 from database/creds/{}",
            app.tag, app.dynamic_role
        )),
        "{body}"
    );
    let (status, _, ctype) = admin_get(admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    assert_eq!(admin_get(admin, "/nope").unwrap().0, 404);

    // Probes must not distort the client cache statistics: /readyz looks without a cache hit.
    let hits = |m: &str| sample_value(m, "dbward_credential_cache_total", &[("result", "hit")]).unwrap_or(0.0);
    let before = hits(&scrape(admin));
    for _ in 0..5 {
        assert_eq!(admin_get(admin, "/readyz").unwrap().0, 200);
    }
    assert_eq!(hits(&scrape(admin)), before);

    // Scrape-time gauges: the credential has most of its hour left, the token some of its TTL.
    let m = scrape(admin);
    let left = sample_value(&m, "dbward_credential_expires_in_seconds", &[("database", &app.tag)]).expect(&m);
    assert!((3000.0..=3600.0).contains(&left), "{left}\n{m}");
    let token = sample_value(&m, "dbward_vault_token_expires_in_seconds", &[]).expect(&m);
    assert!(token > 0.0, "{m}");
    assert_eq!(
        sample_value(&m, "dbward_database_ready", &[("database", &app.tag)]),
        Some(1.0),
        "{m}"
    );

    // Bytes are counted while a session is open, not only when it ends.
    let c = connect(port, &app.dbname, "app").await;
    c.simple_query("select repeat('x', 100000)").await.unwrap();
    let to_client = sample_value(
        &scrape(admin),
        "dbward_relayed_bytes_total",
        &[("database", &app.tag), ("direction", "to_client")],
    )
    .unwrap_or(0.0);
    assert!(
        to_client > 100_000.0,
        "{to_client} bytes counted with the session still open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_database_that_is_not_ready_and_why() {
    let s = servers();
    let app = s.new_app("ops_notready");
    // The token may read nothing this entry needs.
    app.set_policy("path \"secret/data/nothing\" { capabilities = [\"read\"] }\n");
    let cfg = app.config("database").with_admin();
    let admin = cfg.admin_port();
    let _d = Dbward::start(&cfg);
    let (status, body, _) = admin_get(admin, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&format!("{}: NOT READY", app.tag)), "{body}");
    assert!(
        body.contains("403") && body.contains(&format!("database/creds/{}", app.dynamic_role)),
        "{body}"
    );
    let m = scrape(admin);
    assert_eq!(
        sample_value(&m, "dbward_database_ready", &[("database", &app.tag)]),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample_value(&m, "dbward_credential_expires_in_seconds", &[("database", &app.tag)]),
        Some(0.0),
        "{m}"
    );
}

// ---------------------------------------------------------------------------------------------
// Prometheus, promtool, the dashboard and the alerts.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_connection_count() {
    if !have("prometheus") {
        eprintln!("SKIPPED: prometheus is not installed (Debian package `prometheus`)");
        return;
    }
    let s = servers();
    let app = s.new_app("ops_prometheus");
    let cfg = app.config("database").with_admin();
    let (port, admin) = (cfg.port(), cfg.admin_port());
    let _d = Dbward::start(&cfg);
    let prom = std::sync::Arc::new(Prometheus::start(&format!("127.0.0.1:{admin}")));

    wait_for_scalar(&prom, "up{job=\"dbward\"}".into(), 1.0, "prometheus sees dbward up").await;

    let client = connect(port, &app.dbname, "app").await;
    client.simple_query("select 1").await.unwrap();
    let active = format!("dbward_client_connections_active{{database=\"{}\"}}", app.tag);
    wait_for_scalar(&prom, active, 1.0, "prometheus reports 1 active connection").await;
    // At least ours (the harness's readiness probe connects too).
    let total = prom.scalar("sum(dbward_client_connections_total)").unwrap();
    assert!(total >= 1.0, "{total}");

    // Every dashboard query is valid PromQL for this Prometheus (Grafana's variables replaced
    // by what "All" and the automatic rate interval would send).
    for expr in dashboard_exprs() {
        let q = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$database", ".*");
        let q = if q.starts_with("label_values(") {
            // A Grafana function, not PromQL: check its selector instead.
            q.trim_start_matches("label_values(")
                .rsplit_once(',')
                .unwrap()
                .0
                .to_string()
        } else {
            q
        };
        prom.query(&q)
            .unwrap_or_else(|e| panic!("dashboard query {expr:?} is not valid PromQL: {e}"));
    }

    drop(client);
    let active = format!("dbward_client_connections_active{{database=\"{}\"}}", app.tag);
    wait_for_scalar(&prom, active, 0.0, "prometheus reports 0 active connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_and_cover_the_dashboard_and_alerts() {
    let s = servers();
    let app = s.new_app("ops_metrics");
    let (_d, admin, client) = exercise_everything(&app).await;
    let m = scrape(admin);

    // Labels are database entry names and fixed vocabularies: never users, leases or secrets.
    // "le" is the bucket label Prometheus adds to histograms.
    let allowed: Vec<&str> = dbward::metrics::LABEL_NAMES.iter().copied().chain(["le"]).collect();
    for line in m.lines().filter(|l| !l.starts_with('#') && l.contains('{')) {
        let labels = line.split_once('{').unwrap().1.rsplit_once('}').unwrap().0;
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let name = pair.split_once('=').unwrap().0.trim_start_matches(',');
            assert!(allowed.contains(&name), "label {name:?} in {line}");
        }
    }
    for f in families(&m).keys() {
        assert!(f.starts_with("dbward_"), "{f}");
    }
    // Everything the issue asks for.
    let names = sample_names(&m);
    for want in [
        "dbward_client_connections_total",
        "dbward_client_connections_active",
        "dbward_client_connections_rejected_total",
        "dbward_upstream_connect_seconds_bucket",
        "dbward_upstream_connect_failures_total",
        "dbward_relayed_bytes_total",
        "dbward_credential_cache_total",
        "dbward_credential_fetch_total",
        "dbward_credential_expires_in_seconds",
        "dbward_vault_token_expires_in_seconds",
        "dbward_vault_requests_total",
        "dbward_vault_request_seconds_bucket",
        "dbward_lease_renewals_total",
        "dbward_lease_revocations_total",
        "dbward_cancel_requests_total",
        "dbward_build_info",
        "dbward_database_ready",
    ] {
        assert!(names.contains(want), "{want} missing from /metrics:\n{m}");
    }
    assert_eq!(
        sample_value(&m, "dbward_client_connections_active", &[("database", &app.tag)]),
        Some(1.0)
    );
    assert_eq!(
        sample_value(&m, "dbward_cancel_requests_total", &[("result", "routed")]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample_value(
            &m,
            "dbward_client_connections_rejected_total",
            &[("reason", "credential")]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        sample_value(&m, "dbward_vault_requests_total", &[("status", "403")]).is_some(),
        "{m}"
    );

    // promtool's linter on the live exposition.
    if have("promtool") {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let said = output_text(&out);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool check metrics:\n{said}\n---\n{m}"
        );
    } else {
        eprintln!("SKIPPED promtool check metrics: promtool is not installed");
    }

    // Every metric the dashboard and the alerts query is one dbward exports.
    let types = families(&m);
    let exprs: Vec<(String, String)> = dashboard_exprs()
        .into_iter()
        .map(|e| ("dashboards/dbward.json".to_string(), e))
        .chain(
            alert_exprs()
                .into_iter()
                .map(|e| ("dashboards/dbward-alerts.yml".to_string(), e)),
        )
        .collect();
    assert!(exprs.len() > 20, "too few expressions found: {exprs:?}");
    let mut used = BTreeSet::new();
    for (file, expr) in &exprs {
        for name in metric_names_in(expr) {
            assert!(
                is_exported(&name, &names, &types),
                "{file}: {name} (in {expr:?}) is not exported by dbward:\n{m}"
            );
            used.insert(name);
        }
    }
    assert!(used.len() >= 12, "{used:?}");
    drop(client);
}

#[test]
fn metric_names_are_found_in_promql() {
    let e = r#"histogram_quantile(0.99, sum by (le) (rate(dbward_upstream_connect_seconds_bucket{job="dbward_x"}[5m]))) / notdbward_y + dbward_a:b"#;
    let got: Vec<String> = metric_names_in(e).into_iter().collect();
    assert_eq!(got, ["dbward_a:b", "dbward_upstream_connect_seconds_bucket"]);
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    if !have("promtool") {
        eprintln!("SKIPPED: promtool is not installed (Debian package `prometheus`)");
        return;
    }
    for args in [
        ["check", "rules", "dashboards/dbward-alerts.yml"],
        ["test", "rules", "dashboards/dbward-alerts.test.yml"],
    ] {
        let out = Command::new("promtool").args(args).current_dir(REPO).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}",
            args.join(" "),
            output_text(&out)
        );
    }
    let exprs = alert_exprs();
    assert_eq!(exprs.len(), 5, "{exprs:?}");
}

// ---------------------------------------------------------------------------------------------
// systemd units.
// ---------------------------------------------------------------------------------------------

#[test]
fn systemd_units_are_hardened_and_verify_clean() {
    let service = fs::read_to_string(Path::new(REPO).join("config/dbward.service")).unwrap();
    let socket = fs::read_to_string(Path::new(REPO).join("config/dbward.socket")).unwrap();
    let settings: Vec<&str> = service.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    for want in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RuntimeDirectory=dbward",
        "CapabilityBoundingSet=",
        "PrivateTmp=yes",
        "MemoryDenyWriteExecute=yes",
    ] {
        assert!(settings.contains(&want), "dbward.service lacks {want}");
    }
    assert!(settings.iter().any(|l| l.starts_with("WatchdogSec=")));
    assert!(settings.iter().any(|l| l.starts_with("LoadCredential=")));
    assert!(settings
        .iter()
        .any(|l| l.starts_with("User=") || *l == "DynamicUser=yes"));

    // The socket unit listens exactly where the example config does (dbward adopts passed
    // sockets by address, so any difference would leave a socket unused).
    let example: toml::Table = fs::read_to_string(Path::new(REPO).join("config/dbward.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let mut listens: Vec<String> = example["databases"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| {
            d["listen"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap().to_string())
        })
        .collect();
    listens.push(example["admin"]["listen"].as_str().unwrap().to_string());
    let streams: Vec<&str> = socket
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ListenStream="))
        .collect();
    assert!(!streams.is_empty());
    for s in &streams {
        assert!(
            listens.iter().any(|l| l == s),
            "dbward.socket ListenStream={s} is not a listen address of config/dbward.toml"
        );
    }

    if !have("systemd-analyze") {
        eprintln!("SKIPPED systemd-analyze verify: systemd-analyze is not installed");
        return;
    }
    // verify checks that the binary exists: point the copies at the one cargo built.
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_dbward");
    fs::write(
        dir.path().join("dbward.service"),
        service.replace("/usr/local/bin/dbward", bin),
    )
    .unwrap();
    fs::write(dir.path().join("dbward.socket"), &socket).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("dbward.service"))
        .arg(dir.path().join("dbward.socket"))
        .output()
        .unwrap();
    let said = output_text(&out);
    // Unknown or misspelt keys are only warnings: a clean unit prints nothing at all.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown.
// ---------------------------------------------------------------------------------------------

fn refused(port: u16) -> bool {
    matches!(
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

/// Waits until the client listener on `port` refuses connections.
async fn wait_listener_closed(port: u16) {
    wait_until_async(Duration::from_secs(10), "client listener closed", move || {
        if refused(port) {
            Ok(())
        } else {
            Err("still accepting".into())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_ends_open_sessions_with_57p01_and_exits_0() {
    let s = servers();
    let app = s.new_app("ops_drain");
    let cfg = app.config("database").with_admin().proxy("shutdown_grace", "2s");
    let (port, admin) = (cfg.port(), cfg.admin_port());
    let mut d = Dbward::start(&cfg);
    let (client, conn) = connect_watched(port, &app.dbname).await;
    client.simple_query("select 1").await.unwrap();

    let sent = Instant::now();
    d.signal(libc::SIGTERM);
    // Listeners close at once; the admin server keeps answering through the drain, not ready.
    wait_listener_closed(port).await;
    let (status, body, _) = admin_get(admin, "/readyz").expect("admin answers during the drain");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    assert_eq!(admin_get(admin, "/healthz").unwrap().0, 200);
    assert!(sample_value(&scrape(admin), "dbward_database_ready", &[("database", &app.tag)]) == Some(0.0));

    // The idle session is told 57P01 once the grace period is over.
    let ended = tokio::time::timeout(Duration::from_secs(20), conn)
        .await
        .expect("session ended")
        .unwrap();
    let waited = sent.elapsed();
    let err = ended.expect_err("the session ends with an error");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("57P01"), "{err}");
    assert!(
        waited >= Duration::from_millis(1900),
        "57P01 after {waited:?}, before the 2s grace"
    );
    assert!(client.simple_query("select 1").await.is_err());

    let status = d.wait_exit(Duration::from_secs(20)).expect("dbward exits");
    assert!(status.success(), "{status}\n{}", d.log_contents());
    let log = d.log_contents();
    assert!(log.contains("grace period over"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_as_soon_as_the_last_session_ends() {
    let s = servers();
    let app = s.new_app("ops_drain_early");
    let cfg = app.config("database").with_admin().proxy("shutdown_grace", "60s");
    let port = cfg.port();
    let mut d = Dbward::start(&cfg);
    let (client, conn) = connect_watched(port, &app.dbname).await;
    client
        .batch_execute("create temp table t(x int); insert into t values (1)")
        .await
        .unwrap();

    d.signal(libc::SIGTERM);
    wait_listener_closed(port).await;
    // The session is not cut: it keeps working during the drain.
    let rows = client
        .simple_query("select count(*) from t")
        .await
        .expect("open session works while draining");
    assert!(!rows.is_empty());
    assert!(d.is_running());
    let started = Instant::now();
    drop(client);
    assert!(conn.await.unwrap().is_ok());
    let status = d
        .wait_exit(Duration::from_secs(20))
        .expect("dbward exits once the session is gone");
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited for the grace period instead of the session"
    );
}

// ---------------------------------------------------------------------------------------------
// Logs.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_a_session_end_line_and_no_secrets() {
    let s = servers();
    let app = s.new_app("ops_json");
    let cfg = app.config("static").with_admin();
    let port = cfg.port();
    // Everything every crate logs, at every level.
    let d = Dbward::start_with_env(&cfg, &[("DBWARD_LOG_FORMAT", "json"), ("RUST_LOG", "trace")]);
    let client = connect(port, &app.dbname, "app").await;
    client.simple_query("select 'hello'").await.unwrap();
    drop(client);
    wait_until_async(Duration::from_secs(20), "session end logged", {
        let path = d.log_path.clone();
        move || {
            let log = fs::read_to_string(&path).unwrap_or_default();
            if log.contains("session ended") {
                Ok(())
            } else {
                Err(log)
            }
        }
    })
    .await;

    let log = d.log_contents();
    let mut ended = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{line}");
        if v["message"] == "session ended" {
            ended = Some(v);
        }
    }
    let ended = ended.expect("a session ended line");
    assert!(ended["duration"].is_string(), "{ended}");
    assert!(ended["bytes_to_upstream"].as_u64().unwrap() > 0, "{ended}");
    assert!(ended["bytes_to_client"].as_u64().unwrap() > 0, "{ended}");
    let span = &ended["span"];
    assert_eq!(span["database"], app.tag.as_str(), "{ended}");
    assert!(span["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{ended}");
    assert!(span["backend_pid"].as_u64().is_some(), "{ended}");
    assert_eq!(span["credential"], 1, "{ended}");

    // No secrets at any level: the Postgres password Vault handed out, the workload JWT (nor
    // its signature alone), Vault tokens.
    let (_, password, _) = app.read_creds("static");
    let jwt = app.jwt();
    let signature = jwt.rsplit('.').next().unwrap();
    for (what, secret) in [
        ("password", password.as_str()),
        ("JWT", jwt.as_str()),
        ("JWT signature", signature),
    ] {
        assert!(!log.contains(secret), "the {what} appears in the log");
    }
    let lower = log.to_lowercase();
    for marker in ["x-vault-token", "client_token"] {
        assert!(!lower.contains(marker), "{marker} appears in the log");
    }
}

// ---------------------------------------------------------------------------------------------
// systemd notify and socket activation (need the calls from src/systemd.rs wired into app.rs).
// ---------------------------------------------------------------------------------------------

#[test]
fn systemd_is_notified_ready_watchdog_and_stopping() {
    let s = servers();
    let app = s.new_app("ops_notify");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let cfg = app.config("database").with_admin().proxy("shutdown_grace", "1s");
    let port = cfg.port();
    let notify = path.to_str().unwrap();
    let mut d = Dbward::spawn(&cfg, &[("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", "500000")]);
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification within 30 s");
        // sd_notify(3) assignments are newline-separated; sd-notify ends each with one.
        String::from_utf8_lossy(&buf[..n]).trim_end_matches('\n').to_string()
    };

    // READY=1 comes only once the listeners are bound (they accept at once).
    let mut first = recv();
    while first == "WATCHDOG=1" {
        first = recv();
    }
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "READY=1 before the listener accepts"
    );
    // Watchdog pings at half the 0.5 s interval.
    let t = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        if recv() == "WATCHDOG=1" {
            pings += 1;
        }
    }
    assert!(t.elapsed() < Duration::from_secs(5));

    d.signal(libc::SIGTERM);
    let stopping = loop {
        let m = recv();
        if m != "WATCHDOG=1" {
            break m;
        }
    };
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(
        stopping.lines().any(|l| l.starts_with("EXTEND_TIMEOUT_USEC=")),
        "{stopping:?}"
    );
    let status = d.wait_exit(Duration::from_secs(20)).expect("dbward exits");
    assert!(status.success(), "{status}");
}

/// Runs dbward with `fds` passed as systemd would (descriptors 3.., LISTEN_FDS, LISTEN_PID).
fn spawn_socket_activated(config: &Path, log: &Path, fds: &[std::os::fd::RawFd]) -> ChildGuard {
    let out = fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut cmd = Command::new("/bin/sh");
    // LISTEN_PID must be dbward's own pid: the shell's, which exec keeps.
    cmd.args([
        "-c",
        "LISTEN_PID=$$ exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_dbward"),
        "run",
        "--config",
    ])
    .arg(config)
    .env("LISTEN_FDS", fds.len().to_string())
    .env("RUST_LOG", "dbward=debug")
    .env("NO_COLOR", "1")
    .stdin(Stdio::null())
    .stdout(out.try_clone().unwrap())
    .stderr(out);
    let fds = fds.to_vec();
    // SAFETY: only dup/dup2 (async-signal-safe) between fork and exec. The sources are first
    // moved above the target range so that no dup2 overwrites a source still to be copied.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = Vec::new();
            for &fd in &fds {
                let h = libc::fcntl(fd, libc::F_DUPFD, 100);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(h);
            }
            for (i, &h) in high.iter().enumerate() {
                if libc::dup2(h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    ChildGuard::spawn(cmd).expect("spawn dbward")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activated_listeners_survive_a_restart() {
    use std::os::fd::AsRawFd;
    let s = servers();
    let app = s.new_app("ops_activation");
    let dir = tempfile::tempdir().unwrap();
    // The sockets systemd would hold: TCP for clients and admin, and a Unix socket.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_port = admin.local_addr().unwrap().port();
    let unix_path = dir.path().join(".s.PGSQL.6432");
    let unix = std::os::unix::net::UnixListener::bind(&unix_path).unwrap();
    let mut cfg = app
        .config("database")
        .listen(&[format!("127.0.0.1:{port}"), unix_path.display().to_string()])
        .proxy("shutdown_grace", "1s");
    cfg.admin = Some(format!("127.0.0.1:{admin_port}"));
    let config = dir.path().join("dbward.toml");
    fs::write(&config, cfg.toml()).unwrap();
    let log = dir.path().join("dbward.log");
    let fds = [tcp.as_raw_fd(), unix.as_raw_fd(), admin.as_raw_fd()];

    let mut first = spawn_socket_activated(&config, &log, &fds);
    // Answering on the passed admin socket means the sockets were adopted (binding them
    // anew fails: they are in use) and nothing waits forever on a backlog nobody accepts.
    wait_until(Duration::from_secs(30), "dbward serves the passed sockets", || {
        if let Some(status) = first.0.try_wait().unwrap() {
            panic!(
                "dbward exited ({status}):\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        match admin_get(admin_port, "/healthz") {
            Ok((200, _, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let c = connect(port, &app.dbname, "app").await;
    c.simple_query("select 1").await.unwrap();
    drop(c);
    signal_and_wait(&mut first);
    // dbward is gone, but the socket is systemd's (here: ours): it stays, and so does the file.
    assert!(unix_path.exists(), "dbward removed the socket file it was handed");
    let log_text = fs::read_to_string(&log).unwrap();
    assert!(
        !log_text.contains("no listen address in the config matches"),
        "{log_text}"
    );

    // A client that connects while dbward is down waits in the backlog for the next one.
    let waiting = tokio::spawn(async move {
        let c = connect(port, "ignored", "app").await;
        c.simple_query("select 1").await.map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = spawn_socket_activated(&config, &log, &fds);
    tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiting client is served")
        .unwrap()
        .expect("query on the connection made while dbward was down");
    signal_and_wait(&mut second);
}

fn signal_and_wait(p: &mut ChildGuard) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            return;
        }
        assert!(Instant::now() < deadline, "dbward did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
