//! A fleet starting at once against a rate-limited Vault: 30 dbward processes, one OpenBao dev
//! server with a `sys/quotas/rate-limit` quota of 10 requests per second (its own binary: the
//! quota covers every request to that server). Every instance must be ready within 30 s, and
//! the 429s they were answered, read from their own metrics, must stay at 2 per instance on
//! average or fewer: a fleet that retries into the limit keeps it exhausted for everyone.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use common::{servers, Dbward};

const INSTANCES: usize = 30;

/// `GET /metrics` of a dbward admin listener (None while it does not answer).
fn metrics(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The sum of every sample of `name` whose labels include all of `labels`.
fn sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[tokio::test]
async fn thirty_instances_started_together_are_ready_within_30s_with_few_429s() {
    let s = servers();
    let app = s.new_app("fleet_quota");
    let configs: Vec<_> = (0..INSTANCES).map(|_| app.config("database").with_admin()).collect();
    s.vault_write(
        "sys/quotas/config",
        &json!({"enable_rate_limit_response_headers": true}),
    );
    s.vault_write("sys/quotas/rate-limit/fleet", &json!({"rate": 10, "interval": "1s"}));

    let started = Instant::now();
    let fleet: Vec<Dbward> = configs.iter().map(|c| Dbward::spawn(c, &[])).collect();
    let mut ready = [false; INSTANCES];
    let deadline = started + Duration::from_secs(30);
    while ready.iter().any(|r| !r) && Instant::now() < deadline {
        for (i, c) in configs.iter().enumerate() {
            if !ready[i] {
                ready[i] = metrics(c.admin_port())
                    .is_some_and(|m| sum(&m, "dbward_database_ready", &[("database", &app.tag)]) == 1.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    let not_ready: Vec<usize> = (0..INSTANCES).filter(|&i| !ready[i]).collect();
    assert!(
        not_ready.is_empty(),
        "{} of {INSTANCES} instances not ready after {took:?}; the first one's log:\n{}",
        not_ready.len(),
        fleet[not_ready[0]].log_contents()
    );

    let mut answered_429 = 0.0;
    let mut requests = 0.0;
    for c in &configs {
        let m = metrics(c.admin_port()).expect("metrics");
        answered_429 += sum(&m, "dbward_vault_requests_total", &[("status", "429")]);
        requests += sum(&m, "dbward_vault_requests_total", &[]);
    }
    eprintln!("{INSTANCES} instances ready in {took:?}: {requests} Vault requests, {answered_429} answered 429");
    assert!(
        answered_429 <= 2.0 * INSTANCES as f64,
        "{answered_429} answers of 429 for {INSTANCES} instances: the fleet retried into the limit"
    );
    // The quota was really in force: 60 requests cannot all pass at 10 per second.
    assert!(answered_429 >= 1.0, "no 429 at all: was the quota applied?");
}
