//! The Vault auth methods other than jwt, against a real OpenBao: approle (role_id and
//! secret_id files) and token (a token file, its TTL and policies from lookup-self).

// The shared/exclusive guard of the servers is held for a whole test, across awaits, on
// the test's own single-threaded runtime: that is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use serde_json::json;

/// `current_user` of a new session through dbward on `port`.
async fn user_via(port: u16, dbname: &str) -> Result<String, tokio_postgres::Error> {
    whoami(&try_connect(port, dbname, "x").await?).await
}

#[tokio::test]
async fn approle_login_reads_role_id_and_secret_id_files() {
    let (s, _g, app) = shared_app("auth_approle");
    let mount = format!("approle-{}", app.tag.replace('_', "-"));
    s.vault_write(&format!("sys/auth/{mount}"), &json!({"type": "approle"}));
    s.vault_write(
        &format!("auth/{mount}/role/payments"),
        &json!({"token_policies": [app.policy], "token_ttl": "1h"}),
    );
    let (_, role) = s.vault_read(&format!("auth/{mount}/role/payments/role-id"));
    let role_id = role["data"]["role_id"].as_str().unwrap().to_string();
    let secret = s.vault_write(&format!("auth/{mount}/role/payments/secret-id"), &json!({}));
    let secret_id = secret["data"]["secret_id"].as_str().unwrap().to_string();
    let (rid, sid) = (app.dir.join("role-id"), app.dir.join("secret-id"));
    std::fs::write(&rid, format!("{role_id}\n")).unwrap();
    std::fs::write(&sid, &secret_id).unwrap();

    let mut config = app.config("static");
    config.auth = Auth::new(
        "approle",
        &[
            ("mount", &mount),
            ("role_id_file", rid.to_str().unwrap()),
            ("secret_id_file", sid.to_str().unwrap()),
        ],
    );
    let d = Dbward::start(&config);
    let port = d.port();
    assert_eq!(user_via(port, &app.dbname).await.unwrap(), app.static_pg_role);
    assert_eq!(s.count_audit_requests(&format!("auth/{mount}/login")), 1);
    let log = d.log_contents();
    assert!(!log.contains(&secret_id), "the secret_id reached the log");
    assert!(log.contains("method=approle"), "{log}");
}

#[tokio::test]
async fn token_method_learns_policies_from_lookup_self_and_names_them_on_denial() {
    let (s, _g, app) = shared_app("auth_token");
    let created = s.vault_write("auth/token/create", &json!({"policies": [app.policy], "ttl": "1h"}));
    let token = created["auth"]["client_token"].as_str().unwrap().to_string();
    let file = app.dir.join("vault-token");
    std::fs::write(&file, &token).unwrap();

    // A second entry reads a path outside the policy.
    let mut denied = app.entry("denied", "kv");
    denied.dbname = None;
    denied.credentials = Credentials::kv("secret/data/elsewhere/db");
    let mut config = app.config("static").entry(denied);
    config.auth = Auth::new("token", &[("token_file", file.to_str().unwrap())]);
    let (port, denied_port) = (config.port(), config.databases[1].port());
    let d = Dbward::start(&config);
    assert_eq!(user_via(port, &app.dbname).await.unwrap(), app.static_pg_role);
    let err = user_via(denied_port, &app.dbname).await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "28000");
    assert!(
        db.message().contains("Vault denied read of secret/data/elsewhere/db"),
        "{}",
        db.message()
    );
    assert!(
        db.detail().unwrap_or_default().contains(&app.policy),
        "{:?}",
        db.detail()
    );
    assert!(!d.log_contents().contains(&token), "the Vault token reached the log");
}
