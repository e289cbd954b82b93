//! `dbward check` and `dbward policy`, run as a user runs them, against real OpenBao and
//! Postgres: the 3 AM scenario (secret moved, policy not) and its fix by the generated policy,
//! clean-up of what the check creates, no secret in the output, and every diagnostic that can be
//! produced on one machine (JWT times and claims, TTLs, Vault unreachable / sealed / TLS, 28P01,
//! 3D000, clock skew).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

/// What a run of the binary left: exit code, stdout, stderr.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// The report line (marker, scope, title) containing `needle`, and its fix line if any.
    fn line(&self, needle: &str) -> String {
        let lines: Vec<&str> = self.stdout.lines().collect();
        let i = lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{}", self.all()));
        let mut out = lines[i].to_string();
        if let Some(next) = lines.get(i + 1) {
            if next.trim_start().starts_with("fix:") {
                out.push('\n');
                out.push_str(next);
            }
        }
        out
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.all()))
    }
}

/// Writes `config` next to the app's files and runs `dbward <args> --config FILE`.
fn dbward(dir: &Path, name: &str, config: &TestConfig, args: &[&str], env: &[(&str, &str)]) -> Out {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config.toml()).expect("write config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dbward"));
    cmd.args(args)
        .arg("--config")
        .arg(&path)
        .env("NO_COLOR", "1")
        .env_remove("VAULT_TOKEN")
        .env_remove("BAO_TOKEN")
        .env_remove("DBWARD_CONFIG")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run dbward");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn check(app: &TestApp, name: &str, config: &TestConfig, extra: &[&str]) -> Out {
    let mut args = vec!["check"];
    args.extend_from_slice(extra);
    dbward(&app.dir, name, config, &args, &[])
}

/// `check` of the app's KV entry, which must fail; returns its output and its login line.
fn failed_login(app: &TestApp, name: &str) -> (Out, String) {
    let out = check(app, name, &app.config("kv"), &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    let line = out.line("login (jwt role");
    (out, line)
}

/// The first entry of kind `kind` in a `check --json` report.
fn check_of<'a>(report: &'a Value, kind: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {report:#}"))
}

/// Leases Vault still holds under `database/creds/<role>/`.
fn leases_of(s: &Servers, role: &str) -> Vec<String> {
    let (status, body) = s.vault_request(
        "LIST",
        &format!("sys/leases/lookup/database/creds/{role}/"),
        Some(ROOT_TOKEN),
        None,
    );
    match status {
        404 => vec![],
        200 => body["data"]["keys"]
            .as_array()
            .map(|a| a.iter().filter_map(|k| k.as_str().map(str::to_string)).collect())
            .unwrap_or_default(),
        other => panic!("LIST leases: HTTP {other} {body}"),
    }
}

/// The 3 AM scenario: the KV secret moved to `.../db-v2` and the config followed, the policy
/// did not. `check` fails and names the new path, the missing "read", the token's policies and
/// the role; `dbward policy` prints a policy that, applied, makes the same check pass.
#[test]
fn moved_secret_fails_check_and_the_generated_policy_fixes_it() {
    let (_, _g, app) = shared_app("chk_seed");
    let new_path = app.move_kv_secret();
    let mut cfg = app.config("kv").entry(app.entry("dyn", "database"));
    cfg.databases[0].credentials = Credentials::kv(&new_path);

    let out = check(&app, "seed", &cfg, &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    let line = out.line(&format!("read {new_path}"));
    assert!(line.starts_with(&format!("FAIL {}", app.tag)), "{line}");
    assert!(line.contains("missing capability \"read\""), "{line}");
    assert!(
        line.contains(&format!("token policies: {}, default", app.policy)),
        "{line}"
    );
    assert!(
        line.contains(&format!("issued by jwt role {} at auth/jwt", app.jwt_role)),
        "{line}"
    );
    assert!(
        line.contains(&format!("fix: add path \"{new_path}\" {{ capabilities = [\"read\"] }}")),
        "{line}"
    );
    assert!(line.contains("dbward policy --config"), "{line}");
    // The entry the policy does allow works all the way to Postgres.
    assert!(out.line("SELECT 1 ok").starts_with("ok   dyn"), "{}", out.all());
    assert!(out.stdout.contains("dbward check FAILED"), "{}", out.all());

    let j = check(&app, "seed", &cfg, &["--json"]).json();
    assert_eq!(j["ok"], false);
    let failed: Vec<&Value> = j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "fail")
        .collect();
    assert_eq!(failed.len(), 1, "{j:#}");
    assert_eq!(failed[0]["path"], new_path.as_str());
    assert_eq!(failed[0]["missing"], json!(["read"]));
    assert_eq!(failed[0]["scope"], app.tag.as_str());

    let policy = dbward(&app.dir, "seed", &cfg, &["policy"], &[]);
    assert_eq!(policy.code, 0, "{}", policy.all());
    let hcl = policy.stdout;
    assert!(hcl.contains(&format!("# database entry \"{}\": username and password from a KV v2 secret\npath \"{new_path}\" {{\n  capabilities = [\"read\"]\n}}", app.tag)), "{hcl}");
    assert!(
        hcl.contains(&format!(
            "# database entry \"dyn\": dynamic credentials of database role \"{}\"",
            app.dynamic_role
        )),
        "{hcl}"
    );
    assert!(
        hcl.contains("path \"sys/leases/renew\" {\n  capabilities = [\"update\"]\n}"),
        "{hcl}"
    );
    assert!(
        hcl.contains("path \"sys/leases/revoke\" {\n  capabilities = [\"update\"]\n}"),
        "{hcl}"
    );
    assert!(
        !hcl.contains(&format!("\"{}\"", app.kv_path)),
        "the old path is not needed: {hcl}"
    );

    app.set_policy(&hcl);
    let out = check(&app, "seed", &cfg, &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.line(&format!("read {new_path}")).starts_with("ok"), "{}", out.all());
    assert!(
        out.line(&format!("SELECT 1 ok as {}", app.kv_username))
            .starts_with(&format!("ok   {}", app.tag)),
        "{}",
        out.all()
    );
    assert!(!out.stdout.contains("FAIL"), "{}", out.all());
    assert!(out.stdout.contains("dbward check passed"), "{}", out.all());
}

/// The check's lease is revoked (its Postgres role dropped) and so is the check's token.
#[test]
fn check_revokes_its_test_lease_and_its_token() {
    let (s, _g, app) = shared_app("chk_cleanup");
    let out = check(&app, "cleanup", &app.config("database"), &["--json"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let j = out.json();
    let by = |kind: &str| check_of(&j, kind);
    assert_eq!(by("upstream")["verdict"], "pass", "{j:#}");
    let revoke = by("revoke_lease");
    assert_eq!(revoke["verdict"], "pass", "{j:#}");
    assert!(revoke["lease_id"]
        .as_str()
        .unwrap()
        .starts_with(&format!("database/creds/{}/", app.dynamic_role)));
    assert_eq!(by("revoke_token")["verdict"], "pass", "{j:#}");
    assert_eq!(
        leases_of(s, &app.dynamic_role),
        Vec::<String>::new(),
        "the test lease is gone"
    );
    // Vault dropped the role it had created for the check.
    let user = by("upstream")["user"].as_str().unwrap().to_string();
    assert_eq!(
        s.pg_exec(
            "postgres",
            &format!("select count(*) from pg_roles where rolname = {}", pg_literal(&user))
        ),
        "0"
    );
}

/// Neither the passwords Vault issued, nor the JWT, nor a Vault token appear in any output.
#[test]
fn output_never_contains_secrets() {
    let (_, _g, app) = shared_app("chk_secrets");
    let (_, static_password, _) = app.read_creds("static");
    let cfg = app
        .config("kv")
        .entry(app.entry("st", "static"))
        .entry(app.entry("dyn", "database"));
    let jwt = app.jwt();
    for args in [&[][..], &["--json"][..], &["--diff-policy", app.policy.as_str()][..]] {
        let out = check(&app, "secrets", &cfg, args);
        assert_eq!(out.code, if args.len() == 2 { 1 } else { 0 }, "{args:?}: {}", out.all());
        let all = out.all();
        if args.len() < 2 {
            assert!(
                all.contains(&app.kv_username),
                "the check did read the KV secret: {all}"
            );
        }
        for (what, secret) in [
            ("KV password", app.kv_password.as_str()),
            ("static password", &static_password),
            ("JWT", &jwt),
        ] {
            assert!(!all.contains(secret), "{what} in the output of check {args:?}:\n{all}");
        }
        // OpenBao service tokens: "s." and 24 characters.
        let bytes = all.as_bytes();
        for (i, w) in bytes.windows(2).enumerate() {
            if w == b"s." && bytes.len() >= i + 26 && bytes[i + 2..i + 26].iter().all(|b| b.is_ascii_alphanumeric()) {
                panic!("something like a Vault token in the output:\n{all}");
            }
        }
    }
    let policy = dbward(&app.dir, "secrets", &cfg, &["policy"], &[]);
    assert!(!policy.all().contains(&app.kv_password));
}

#[test]
fn expired_jwt_is_named_and_not_sent() {
    let (_, _g, app) = shared_app("chk_jwt_exp");
    app.write_jwt(&app.jwt_subject, JWT_AUDIENCE, -300);
    let (out, line) = failed_login(&app, "exp");
    assert!(line.starts_with("FAIL vault"), "{line}");
    assert!(line.contains("the workload JWT has expired"), "{line}");
    assert!(line.contains(app.jwt_path.to_str().unwrap()), "{line}");
    assert!(line.contains("fix: whatever writes"), "{line}");
    assert!(
        out.line(&format!("read {}", app.kv_path)).starts_with("skip"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains(&app.jwt()));
    // Refused on this host, before sending it to Vault.
    assert!(line.contains("vault.auth.token_file"), "{line}");
}

#[test]
fn jwt_not_yet_valid_is_named() {
    let (_, _g, app) = shared_app("chk_jwt_nbf");
    // dbward reads the claims without verifying the signature (Vault verifies), so any key does.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"iss": JWT_ISSUER, "sub": app.jwt_subject, "aud": JWT_AUDIENCE, "nbf": now + 3600, "exp": now + 7200}),
        &jsonwebtoken::EncodingKey::from_secret(b"test"),
    )
    .unwrap();
    std::fs::write(&app.jwt_path, &jwt).unwrap();
    let out = check(&app, "nbf", &app.config("kv"), &["--json"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let j = out.json();
    let login = check_of(&j, "login");
    assert_eq!(login["verdict"], "fail");
    assert_eq!(login["problem"], "jwt_not_yet_valid", "{login:#}");
    assert!(
        login["message"]
            .as_str()
            .unwrap()
            .contains("the JWT is not valid before"),
        "{login:#}"
    );
    assert!(!out.all().contains(&jwt));
}

#[test]
fn audience_not_bound_by_the_role_is_named() {
    let (_, _g, app) = shared_app("chk_aud");
    app.write_jwt(&app.jwt_subject, "not-vault", 3600);
    let (_, line) = failed_login(&app, "aud");
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(
        line.contains("the JWT's aud (not-vault) is not one of the role's bound_audiences"),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "fix: add \"not-vault\" to bound_audiences of auth/jwt/role/{}",
            app.jwt_role
        )),
        "{line}"
    );
}

#[test]
fn subject_not_bound_by_the_role_is_named() {
    let (_, _g, app) = shared_app("chk_sub");
    app.write_jwt("system:serviceaccount:intruder", JWT_AUDIENCE, 3600);
    let (_, line) = failed_login(&app, "sub");
    assert!(
        line.contains("the JWT's sub (system:serviceaccount:intruder) does not match the role's bound subject"),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "bound_subject (or bound_claims.sub) of auth/jwt/role/{}",
            app.jwt_role
        )),
        "{line}"
    );
}

/// The auth role's tokens live 30 minutes at most, the database role's leases 2 hours: leases
/// would die with the token. A warning (exit 0), a failure with --strict.
#[test]
fn token_max_ttl_shorter_than_lease_max_ttl_is_a_warning() {
    let (s, _g, app) = shared_app("chk_tokttl");
    app.set_jwt_role_ttls("10m", Some("30m"));
    // An allowlist, so that --strict fails on the TTL warning alone.
    let cfg = app.config("database").db_line("allowed_users = [\"root\"]");
    let out = check(&app, "tokttl", &cfg, &[]);
    assert_eq!(out.code, 0, "warnings alone pass: {}", out.all());
    let line = out.line("token max TTL vs lease max TTL");
    assert!(line.starts_with("warn"), "{line}");
    assert!(
        line.contains("the token's max TTL (30m) is shorter than the lease max TTL (2h)"),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "raise token_max_ttl of auth/jwt/role/{} to at least 2h",
            app.jwt_role
        )),
        "{line}"
    );
    assert!(out.line("login (jwt role").contains("max TTL 30m"), "{}", out.all());
    let end = out.line("hard end of a new session's credential");
    assert!(
        end.starts_with("ok") && end.contains("30m at most (Vault token max TTL; lease max TTL 2h, token max TTL 30m)"),
        "{end}"
    );

    let strict = check(&app, "tokttl", &cfg, &["--strict"]);
    assert_eq!(strict.code, 1, "{}", strict.all());
    assert_eq!(leases_of(s, &app.dynamic_role), Vec::<String>::new());
}

/// A database role whose leases last 30 s at most: dbward would make a new Postgres role every
/// ~13 s.
#[test]
fn very_short_lease_max_ttl_warns_of_constant_rotation() {
    let (_, _g, app) = shared_app("chk_shortttl");
    let role = app.short_dynamic_role("20s", "30s");
    let mut cfg = app.config("database");
    cfg.databases[0].credentials = Credentials::database(&role);
    let out = check(&app, "short", &cfg, &["--json"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let j = out.json();
    let ttl = check_of(&j, "lease_ttl");
    assert_eq!(ttl["verdict"], "warn", "{ttl:#}");
    assert_eq!(ttl["lease_ttl_seconds"], 20);
    let max = ttl["lease_max_ttl_seconds"].as_u64().unwrap();
    assert!((28..=30).contains(&max), "{ttl:#}");
    let msg = ttl["message"].as_str().unwrap();
    assert!(msg.contains("dbward would replace the credential every ~13s"), "{msg}");
    assert!(
        ttl["fix"].as_str().unwrap().contains(&format!("database/roles/{role}")),
        "{ttl:#}"
    );
}

#[test]
fn unreachable_vault_is_named() {
    let s = servers();
    let app = s.new_app("chk_unreach");
    let port = free_port();
    let mut cfg = app.config("kv");
    cfg.vault_address = format!("http://127.0.0.1:{port}");
    let out = check(&app, "unreach", &cfg, &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    let line = out.line("vault at http://127.0.0.1:");
    assert!(line.starts_with("FAIL vault"), "{line}");
    assert!(
        line.contains("unreachable") && line.contains("Connection refused"),
        "{line}"
    );
    assert!(line.contains("fix: check vault.address"), "{line}");
    assert!(
        out.line(&format!("read {}", app.kv_path)).starts_with("skip"),
        "{}",
        out.all()
    );
}

/// Vault behind TLS with a CA this host does not trust; then trusted; then sealed.
#[test]
fn vault_tls_errors_and_a_sealed_vault_are_named() {
    let s = servers();
    let app = s.new_app("chk_tls");
    let bao = TlsBao::start(&app.dir);
    let mut base = app.config("kv");
    base.vault_address = bao.addr.clone();

    let out = check(&app, "tls", &base, &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    let line = out.line("vault at https://");
    assert!(line.starts_with("FAIL vault"), "{line}");
    assert!(line.contains(&format!("TLS to {} failed", bao.addr)), "{line}");
    assert!(line.contains("fix: vault.ca_file must hold the CA"), "{line}");

    let trusted = TestConfig {
        vault_ca_file: Some(bao.ca.to_string_lossy().into_owned()),
        ..base.clone()
    };
    let out = check(&app, "tls", &trusted, &[]);
    assert!(out.line("vault at https://").starts_with("ok   vault"), "{}", out.all());

    let (code, said) = bao.bao(&["operator", "seal"]);
    assert_eq!(code, 0, "{said}");
    let out = check(&app, "tls", &trusted, &["--json"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let j = out.json();
    let v = &j["checks"][0];
    assert_eq!(v["verdict"], "fail", "{j:#}");
    assert_eq!(v["problem"], "sealed", "{j:#}");
    assert!(v["message"].as_str().unwrap().contains("Vault is sealed"), "{j:#}");
    assert!(v["fix"].as_str().unwrap().contains("unseal"), "{j:#}");
}

/// The KV secret holds a password the server does not accept.
#[test]
fn upstream_refusing_the_credential_is_named() {
    let (s, _g, app) = shared_app("chk_28p01");
    app.write_kv(&app.kv_username, "not-the-password");
    let out = check(&app, "28p01", &app.config("kv"), &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.line(&format!("read {}", app.kv_path)).starts_with("ok"),
        "{}",
        out.all()
    );
    let line = out.line(&format!("upstream 127.0.0.1:{}", s.pg_port()));
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(
        line.contains("the server refused the credential Vault issued") && line.contains("28P01"),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "fix: the KV secret at {} does not hold {}'s current password",
            app.kv_path, app.kv_username
        )),
        "{line}"
    );
    assert!(!out.all().contains("not-the-password"));
}

#[test]
fn missing_database_is_named() {
    let (_, _g, app) = shared_app("chk_3d000");
    let mut cfg = app.config("static");
    cfg.databases[0].dbname = Some("no_such_db".into());
    let out = check(&app, "3d000", &cfg, &["--json"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let j = out.json();
    let up = check_of(&j, "upstream");
    assert_eq!(up["verdict"], "fail");
    assert_eq!(up["sqlstate"], "3D000", "{up:#}");
    assert!(
        up["message"]
            .as_str()
            .unwrap()
            .contains("the server has no database \"no_such_db\""),
        "{up:#}"
    );
    assert!(
        up["fix"].as_str().unwrap().contains("correct databases[0].dbname"),
        "{up:#}"
    );
}

/// An HTTP date (IMF-fixdate) for a unix time.
fn http_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let rfc = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string();
    // 2026-11-26T01:18:08Z
    let (y, mo, d, time) = (&rfc[0..4], &rfc[5..7], &rfc[8..10], &rfc[11..19]);
    let weekday = DAYS[((unix / 86400) % 7) as usize];
    format!(
        "{weekday}, {d} {} {y} {time} GMT",
        MONTHS[mo.parse::<usize>().unwrap() - 1]
    )
}

/// Clock skew cannot be given to a real OpenBao: a stand-in answers every request as a healthy
/// Vault would, with a `Date` ten minutes behind this host's clock.
#[test]
fn clock_skew_against_vault_is_named() {
    let s = servers();
    let app = s.new_app("chk_skew");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 8192];
            let _ = conn.read(&mut buf);
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
            let body = r#"{"initialized":true,"sealed":false,"standby":false,"version":"2.7.2"}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nDate: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                http_date(now - 600),
                body.len()
            );
        }
    });
    let mut cfg = app.config("kv");
    cfg.vault_address = addr;
    let out = check(&app, "skew", &cfg, &["--json"]);
    assert_eq!(out.code, 1, "{}", out.all());
    let j = out.json();
    let clock = check_of(&j, "clock");
    assert_eq!(clock["verdict"], "fail", "{clock:#}");
    let skew = clock["skew_seconds"].as_i64().unwrap();
    assert!((595..=605).contains(&skew), "{clock:#}");
    assert!(
        clock["message"].as_str().unwrap().contains("s ahead of Vault's"),
        "{clock:#}"
    );
    assert!(clock["fix"].as_str().unwrap().contains("NTP"), "{clock:#}");
}

#[test]
fn bad_config_exits_64() {
    let s = servers();
    let app = s.new_app("chk_badcfg");
    let mut bad = app.config("kv");
    bad.auth.method = "ldap".into();
    for args in [&["check"][..], &["check", "--json"][..], &["policy"][..]] {
        let out = dbward(&app.dir, "bad", &bad, args, &[]);
        assert_eq!(out.code, 64, "{args:?}: {}", out.all());
        assert!(
            out.stderr.contains("vault.auth.method: unknown value \"ldap\""),
            "{}",
            out.all()
        );
    }
}

/// `--diff-policy NAME`: the review tool for a path reorganization. Missing paths fail, paths
/// the config no longer uses are warnings; the generated policy has neither.
#[test]
fn diff_policy_shows_missing_and_unused_paths() {
    let (_, _g, app) = shared_app("chk_diff");
    let new_path = app.kv_path.replace("/db", "/db-v2");
    let mut cfg = app.config("kv");
    cfg.databases[0].credentials = Credentials::kv(&new_path);
    let root = [("VAULT_TOKEN", ROOT_TOKEN)];
    let args = ["check", "--diff-policy", app.policy.as_str()];

    let out = dbward(&app.dir, "diff", &cfg, &args, &root);
    assert_eq!(out.code, 1, "{}", out.all());
    let missing = out.line(&format!("read {new_path}"));
    assert!(missing.starts_with(&format!("FAIL policy {}", app.policy)), "{missing}");
    assert!(
        missing.contains("missing: no path in the policy covers it"),
        "{missing}"
    );
    assert!(
        missing.contains(&format!(
            "fix: add path \"{new_path}\" {{ capabilities = [\"read\"] }} to policy \"{}\"",
            app.policy
        )),
        "{missing}"
    );
    let unused = out.line(&format!("path \"{}\"", app.kv_path));
    assert!(
        unused.starts_with("warn") && unused.contains("not used by this config"),
        "{unused}"
    );
    assert!(
        out.line("path \"sys/leases/renew\"").starts_with("warn"),
        "KV needs no lease paths: {}",
        out.all()
    );

    // The workload's own token may not read policies: the fix says how to run it.
    let out = dbward(&app.dir, "diff", &cfg, &args, &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.line(&format!("read sys/policies/acl/{}", app.policy))
            .contains("set VAULT_TOKEN"),
        "{}",
        out.all()
    );

    let hcl = dbward(&app.dir, "diff", &cfg, &["policy"], &[]).stdout;
    app.set_policy(&hcl);
    let out = dbward(&app.dir, "diff", &cfg, &[&args[..], &["--strict"]].concat(), &root);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.line(&format!("read {new_path}")).starts_with("ok"), "{}", out.all());
}

/// The minimal policy most teams write: `read` on the credential path only. The read and the
/// upstream pass; the missing `update` on `sys/leases/revoke` is a warning naming the knob
/// (dbward lets such leases expire), not a failure; the token's own endpoints come with Vault's
/// default policy.
#[test]
fn check_warns_about_a_policy_without_lease_revocation() {
    let (_s, _g, app) = shared_app("chk_norevoke");
    app.set_policy(&format!(
        "path \"database/creds/{}\" {{ capabilities = [\"read\"] }}\n",
        app.dynamic_role
    ));
    // An allowlist, so that --strict fails on the revocation warning alone.
    let cfg = app.config("database").db_line("allowed_users = [\"root\"]");
    let out = check(&app, "norevoke", &cfg, &[]);
    assert_eq!(out.code, 0, "warnings do not fail the check:\n{}", out.all());
    let revoke = out.line("update sys/leases/revoke");
    assert!(revoke.starts_with(&format!("warn {}", app.tag)), "{revoke}");
    assert!(
        revoke.contains("left to expire") && revoke.contains("databases[0].credentials.revoke_unused = false"),
        "{revoke}"
    );
    assert!(
        revoke.contains("add path \"sys/leases/revoke\" { capabilities = [\"update\"] }"),
        "{revoke}"
    );
    let token = out.line("token (auth/token/renew-self");
    assert!(token.starts_with("ok"), "{token}");
    assert!(out.line("SELECT 1 ok").starts_with("ok"), "{}", out.all());
    let strict = check(&app, "norevoke", &cfg, &["--strict"]);
    assert_eq!(strict.code, 1, "--strict fails on the warning:\n{}", strict.all());
}
