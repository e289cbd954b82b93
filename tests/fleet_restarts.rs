//! A crash loop with `vault.state_file`: dbward killed with SIGKILL five times in a row must
//! not log in and mint a new Postgres role at every start. Its own binary: the audit log's
//! login count covers every login to its dev server.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{connect, servers, toml_str, whoami, Dbward};

#[tokio::test]
async fn five_kill_9_restarts_with_a_state_file_cost_at_most_two_logins_and_two_credentials() {
    let s = servers();
    let app = s.new_app("fleet_restarts");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = app
        .config("database")
        .vault_line(&format!("state_file = {}", toml_str(&state.to_string_lossy())));
    let creds_path = format!("database/creds/{}", app.dynamic_role);
    let logins_before = s.count_audit_requests("auth/jwt/login");
    let reads_before = s.count_audit_requests(&creds_path);

    let mut users = Vec::new();
    for round in 0..5 {
        let mut d = Dbward::start(&config);
        let user = whoami(&connect(config.port(), &app.dbname, "x").await).await.unwrap();
        users.push(user);
        // What a crash would lose: the file must hold this run's credential before the kill.
        d.wait_for_log("state file written", Duration::from_secs(10));
        if round > 0 {
            let log = d.log_contents();
            assert!(
                log.contains("reusing the Vault token from the state file"),
                "round {round}:\n{log}"
            );
            assert!(
                log.contains("reusing a credential from the state file"),
                "round {round}:\n{log}"
            );
        }
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the state file holds secrets");
        d.signal(libc::SIGKILL);
        assert!(
            d.wait_exit(Duration::from_secs(10)).is_some(),
            "round {round}: still running"
        );
    }

    let logins = s.count_audit_requests("auth/jwt/login") - logins_before;
    let reads = s.count_audit_requests(&creds_path) - reads_before;
    eprintln!("5 starts: {logins} logins, {reads} credential reads, users {users:?}");
    assert!(logins <= 2, "{logins} logins for 5 starts");
    assert!(reads <= 2, "{reads} credential reads for 5 starts (users {users:?})");
    users.dedup();
    assert!(
        users.len() <= 2,
        "the restarts got {} different Postgres roles: {users:?}",
        users.len()
    );
}
