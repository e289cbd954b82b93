//! dbward against a real three-node OpenBao raft cluster (`tests/common/raft.rs`), every node
//! listed in `vault.address`: the active node is killed while clients keep connecting.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{servers, try_connect, whoami, Dbward, RaftCluster};

/// Clients connect every 0.2 s for 30 s with 8 s leases; the active node is SIGKILLed after
/// 5 s, just after a credential was replaced. No connection may fail, and credentials must keep
/// being replaced (new usernames after the kill) through the surviving nodes.
///
/// Why just after a replacement: the cache rides out a Vault outage of (1 - refresh_fraction) x
/// TTL - expiry_margin, which for an 8 s lease is under a second, while a raft election and
/// the new active node's takeover take 1-3 s here. A kill in that last second fails clients by
/// design (README, "Running a fleet"); with leases of minutes or hours the window is minutes.
#[tokio::test]
async fn killing_the_active_node_fails_no_client_and_credentials_keep_coming() {
    let s = servers();
    let app = s.new_app("fleet_ha");
    let mut cluster = RaftCluster::start();
    cluster.configure_like(&app, "8s", "1h");
    let list: Vec<String> = cluster.addresses().iter().map(|a| format!("\"{a}\"")).collect();
    let config = app
        .config("database")
        .vault_line(&format!("address = [{}]", list.join(", ")))
        .vault_line("request_timeout = \"2s\"")
        .with_admin();
    let d = Dbward::start(&config);

    let started = Instant::now();
    let mut killed: Option<(usize, Instant)> = None;
    let mut before = BTreeSet::new();
    let mut after = BTreeSet::new();
    let mut failures = Vec::new();
    let mut attempts = 0;
    let mut fetches_at_5s = None;
    while started.elapsed() < Duration::from_secs(30) {
        if fetches_at_5s.is_none() && started.elapsed() > Duration::from_secs(5) {
            fetches_at_5s = Some(d.log_contents().matches("fetched credential from Vault").count());
        }
        let fetches = d.log_contents().matches("fetched credential from Vault").count();
        if killed.is_none() && started.elapsed() > Duration::from_secs(5) && fetches > fetches_at_5s.unwrap_or(fetches)
        {
            let leader = cluster.leader().expect("an active node");
            cluster.kill(leader);
            killed = Some((leader, Instant::now()));
        }
        attempts += 1;
        match try_connect(config.port(), &app.dbname, "x").await {
            Ok(c) => match whoami(&c).await {
                Ok(user) => {
                    if killed.is_some() {
                        after.insert(user);
                    } else {
                        before.insert(user);
                    }
                }
                Err(e) => failures.push(format!("{:?}: query: {e}", started.elapsed())),
            },
            Err(e) => failures.push(format!("{:?}: connect: {e}", started.elapsed())),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (leader, _) = killed.expect("the leader was killed");
    assert!(
        failures.is_empty(),
        "{} of {attempts} connections failed after node {leader} was killed: {failures:?}\n{}",
        failures.len(),
        d.log_contents()
    );
    let new: Vec<&String> = after.difference(&before).collect();
    assert!(
        new.len() >= 2,
        "credentials were not replaced through the surviving nodes: before {before:?}, after {after:?}\n{}",
        d.log_contents()
    );
}
