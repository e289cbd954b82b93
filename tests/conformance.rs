//! Differential conformance before authentication: every byte sequence in the table (and a
//! seeded batch generated from the same grammar) goes to the real Postgres 15 and to dbward in
//! front of it, and what a client can observe must be the same: the single-byte answers to
//! SSLRequest/GSSENCRequest, the messages before the close (type, severity and SQLSTATE of an
//! ErrorResponse, protocol-2 or -3 format), whether and when the connection closes, and whether
//! authentication proceeds. The only differences allowed are the deliberate ones listed in
//! [`Deliberate`] (and in the README's protocol section).
//!
//! Stalls are bounded by a 2 s timeout on both sides (Postgres `authentication_timeout`, dbward
//! `startup_timeout`); every read waits on a condition with a deadline.
//!
//! Fuzz mode: `DBWARD_CONFORMANCE_SEED` (default fixed) and `DBWARD_CONFORMANCE_CASES` (default
//! 40) pick the generated sequences; a failure prints the seed and the bytes.

// The servers' disruption lock is held for a whole test, across its awaits, on purpose.
#![allow(clippy::await_holding_lock)]

mod common;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::{cancel_request, gssenc_request, ssl_request, startup, CANCEL_REQUEST, V3_0};

/// Both sides close a stalled startup after this long. Postgres's authentication_timeout also
/// bounds dbward's own upstream logins, so it is not cut finer than a loaded CI machine allows.
const STALL: Duration = Duration::from_secs(2);
/// A close this long after connecting counts as "after the startup timeout".
const LATE: Duration = Duration::from_millis(1400);
/// How long one observation may take at most.
const OBSERVE: Duration = Duration::from_secs(6);

/// What a client can observe, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// The single-byte answer to SSLRequest / GSSENCRequest.
    Byte(char),
    /// A protocol-3 ErrorResponse.
    Error { severity: String, code: String },
    /// A protocol-2 error: 'E' and a NUL-terminated "SEVERITY:  text\n".
    ErrorV2 { severity: String, well_formed: bool },
    /// NegotiateProtocolVersion.
    Negotiate,
    /// An authentication request: authentication proceeds. `ok`: AuthenticationOk.
    Auth { ok: bool },
    /// Any other message type.
    Other(char),
    /// The server closed; `late`: only after the startup timeout.
    Closed { late: bool },
    /// Still open at the end of the observation.
    Open,
}

impl Tok {
    fn terminal(&self) -> bool {
        matches!(self, Tok::Auth { .. } | Tok::Closed { .. } | Tok::Open)
    }
}

/// What the client does.
#[derive(Debug, Clone)]
enum Act {
    /// Write these bytes (one write).
    Send(Vec<u8>),
    /// Wait for the next thing the server does before going on.
    Answer,
    /// Close our side for writing: the server sees EOF.
    Shut,
}

/// Differences kept on purpose; each is in the README's list with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Deliberate {
    /// dbward speaks protocol 3.2 (as Postgres 18 does): no NegotiateProtocolVersion for 3.1/3.2.
    NewerMinor,
    /// Replication startups are refused (0A000) unless the entry has `allow_replication`.
    Replication,
    /// dbward offers no GSSAPI encryption: it answers GSSENCRequest 'N', as a Postgres built
    /// without GSSAPI does; the test Postgres (Debian's) answers 'G'. What such a Postgres does
    /// (postmaster.c, ProcessStartupPacket) is written out here.
    NoGssEncryption(Vec<Tok>),
    /// dbward logs in upstream before it answers, so what the server refuses only after
    /// authentication (an unknown parameter, a startup the server finds too long once dbward
    /// added its user and database) reaches the client where Postgres would ask for a password.
    /// The SQLSTATE is the server's (relayed) or 08001 (the server closed without one).
    RefusedUpstream(&'static str),
}

struct Case {
    name: String,
    acts: Vec<Act>,
    deliberate: Option<Deliberate>,
}

fn case(name: &str, acts: Vec<Act>) -> Case {
    Case {
        name: name.to_string(),
        acts,
        deliberate: None,
    }
}

fn no_gss(name: &str, acts: Vec<Act>, without_gss: Vec<Tok>) -> Case {
    differs(name, acts, Deliberate::NoGssEncryption(without_gss))
}

fn fatal(code: &str) -> Tok {
    Tok::Error {
        severity: "FATAL".into(),
        code: code.into(),
    }
}

const CLOSED: Tok = Tok::Closed { late: false };
const LATE_CLOSE: Tok = Tok::Closed { late: true };
const NO: Tok = Tok::Byte('N');
const AUTH: Tok = Tok::Auth { ok: true };

fn differs(name: &str, acts: Vec<Act>, d: Deliberate) -> Case {
    Case {
        deliberate: Some(d),
        ..case(name, acts)
    }
}

use Act::{Answer, Send, Shut};

/// A packet with a length word and `body`.
fn raw_packet(len: u32, body: &[u8]) -> Vec<u8> {
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// A startup packet with version `code` and a raw parameter area.
fn startup_raw(code: u32, params: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(params);
    raw_packet(body.len() as u32 + 4, &body)
}

fn terminate() -> Vec<u8> {
    vec![b'X', 0, 0, 0, 4]
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The table. `db` is the database every startup names (the app's own).
fn table(db: &str) -> Vec<Case> {
    let user = |v: u32| startup(v, &[("user", "conformance"), ("database", db)]);
    let good = user(V3_0);
    let v2 = 2 << 16;
    vec![
        // --- valid startups
        case("startup 3.0", vec![Send(good.clone())]),
        case(
            "startup 3.0 with application_name and options",
            vec![Send(startup(
                V3_0,
                &[
                    ("user", "u"),
                    ("database", db),
                    ("application_name", "x"),
                    ("options", ""),
                ],
            ))],
        ),
        differs("startup 3.1", vec![Send(user((3 << 16) | 1))], Deliberate::NewerMinor),
        differs("startup 3.2", vec![Send(user((3 << 16) | 2))], Deliberate::NewerMinor),
        case("startup 3.9999 (negotiation)", vec![Send(user((3 << 16) | 9999))]),
        case(
            "startup 3.0 with _pq_ option",
            vec![Send(startup(
                V3_0,
                &[("user", "u"), ("database", db), ("_pq_.grease", "1")],
            ))],
        ),
        case("startup without database", vec![Send(startup(V3_0, &[("user", "u")]))]),
        case(
            "startup with empty application_name",
            vec![Send(startup(
                V3_0,
                &[("user", "u"), ("database", db), ("application_name", "")],
            ))],
        ),
        case(
            "duplicate user",
            vec![Send(startup(V3_0, &[("user", "a"), ("database", db), ("user", "b")]))],
        ),
        case(
            "duplicate application_name",
            vec![Send(startup(
                V3_0,
                &[
                    ("user", "a"),
                    ("database", db),
                    ("application_name", "x"),
                    ("application_name", "y"),
                ],
            ))],
        ),
        differs(
            "non-UTF-8 parameter name",
            vec![Send(startup_raw(V3_0, b"user\0u\0\xff\xfe\0v\0\0"))],
            Deliberate::RefusedUpstream("42704"),
        ),
        differs(
            "replication=database",
            vec![Send(startup(
                V3_0,
                &[("user", "u"), ("database", db), ("replication", "database")],
            ))],
            Deliberate::Replication,
        ),
        // --- refused startups
        case("missing user", vec![Send(startup(V3_0, &[("database", db)]))]),
        case(
            "empty user",
            vec![Send(startup(V3_0, &[("user", ""), ("database", db)]))],
        ),
        case("no parameters at all", vec![Send(startup(V3_0, &[]))]),
        case(
            "missing user, protocol 3.9999 (negotiation first)",
            vec![Send(startup((3 << 16) | 9999, &[("database", db)]))],
        ),
        case(
            "missing user with _pq_ option",
            vec![Send(startup(V3_0, &[("database", db), ("_pq_.x", "1")]))],
        ),
        case("protocol 2.0", vec![Send(startup(v2, &[("user", "u")]))]),
        case("protocol 1.0", vec![Send(startup(1 << 16, &[("user", "u")]))]),
        case("protocol 0.0", vec![Send(startup(0, &[("user", "u")]))]),
        case("protocol 0.1", vec![Send(startup(1, &[("user", "u")]))]),
        case("protocol 2.5", vec![Send(startup((2 << 16) | 5, &[("user", "u")]))]),
        case("protocol 4.0", vec![Send(startup(4 << 16, &[("user", "u")]))]),
        case(
            "protocol 1234.1",
            vec![Send(startup((1234 << 16) | 1, &[("user", "u")]))],
        ),
        case(
            "protocol 2.0 in its own 296-byte layout",
            vec![Send(startup_raw(v2, &[0; 288]))],
        ),
        case("only a version", vec![Send(startup_raw(V3_0, b""))]),
        case("missing terminator", vec![Send(startup_raw(V3_0, b"user\0u\0"))]),
        case("name without value", vec![Send(startup_raw(V3_0, b"user\0"))]),
        case("value without NUL", vec![Send(startup_raw(V3_0, b"user\0u"))]),
        case(
            "bytes after the terminator",
            vec![Send(startup_raw(V3_0, b"user\0u\0\0junk"))],
        ),
        case("empty name mid-packet", vec![Send(startup_raw(V3_0, b"\0user\0u\0\0"))]),
        case(
            "invalid replication value",
            vec![Send(startup(
                V3_0,
                &[("user", "u"), ("database", db), ("replication", "maybe")],
            ))],
        ),
        // --- lengths
        case("length 0", vec![Send(raw_packet(0, &[0; 4]))]),
        case("length 4", vec![Send(raw_packet(4, &[]))]),
        case("length 7", vec![Send(raw_packet(7, &[0, 3, 0]))]),
        case(
            "length 8, version 3.0 only",
            vec![Send(raw_packet(8, &V3_0.to_be_bytes()))],
        ),
        differs(
            "length 10004 (largest allowed)",
            vec![Send(startup_raw(V3_0, &big_params(10004 - 8)))],
            Deliberate::RefusedUpstream("08001"),
        ),
        case(
            "length 10005 (too long)",
            vec![Send(startup_raw(V3_0, &big_params(10005 - 8)))],
        ),
        case("length 0x7fffffff", vec![Send(raw_packet(0x7fff_ffff, &[0; 8]))]),
        case("16 x 0xff", vec![Send(vec![0xff; 16])]),
        case("Terminate before the startup", vec![Send(cat(&[&terminate(), &good]))]),
        case("garbage text", vec![Send(b"GET / HTTP/1.1\r\n\r\n".to_vec())]),
        case(
            "TLS ClientHello bytes without TLS",
            vec![Send(vec![0x16, 0x03, 0x01, 0x00, 0x40, 1, 0, 0])],
        ),
        // --- truncated, then stall or close
        case("1 byte, stall", vec![Send(vec![0])]),
        case("1 byte, close", vec![Send(vec![0]), Shut]),
        case("3 bytes of length, stall", vec![Send(good[..3].to_vec())]),
        case("3 bytes of length, close", vec![Send(good[..3].to_vec()), Shut]),
        case("half a startup, stall", vec![Send(good[..good.len() / 2].to_vec())]),
        case(
            "half a startup, close",
            vec![Send(good[..good.len() / 2].to_vec()), Shut],
        ),
        case(
            "startup less its last byte, close",
            vec![Send(good[..good.len() - 1].to_vec()), Shut],
        ),
        case("0x16 alone, stall", vec![Send(vec![0x16])]),
        case("nothing, stall", vec![]),
        case("nothing, close", vec![Shut]),
        // --- SSLRequest / GSSENCRequest
        case(
            "SSLRequest, startup",
            vec![Send(ssl_request()), Answer, Send(good.clone())],
        ),
        case("SSLRequest, stall", vec![Send(ssl_request()), Answer]),
        case("SSLRequest, close", vec![Send(ssl_request()), Answer, Shut]),
        case(
            "SSLRequest + startup pipelined",
            vec![Send(cat(&[&ssl_request(), &good]))],
        ),
        case(
            "SSLRequest + 1 byte pipelined",
            vec![Send(cat(&[&ssl_request(), &[0]]))],
        ),
        case(
            "SSLRequest twice",
            vec![Send(ssl_request()), Answer, Send(ssl_request())],
        ),
        no_gss(
            "GSSENCRequest, startup",
            vec![Send(gssenc_request()), Answer, Send(good.clone())],
            vec![NO, AUTH],
        ),
        no_gss(
            "GSSENCRequest + startup pipelined",
            vec![Send(cat(&[&gssenc_request(), &good]))],
            vec![NO, fatal("08P01"), CLOSED],
        ),
        no_gss(
            "GSSENCRequest twice",
            vec![Send(gssenc_request()), Answer, Send(gssenc_request())],
            vec![NO, fatal("0A000"), CLOSED],
        ),
        no_gss(
            "GSSENCRequest, SSLRequest, startup",
            vec![
                Send(gssenc_request()),
                Answer,
                Send(ssl_request()),
                Answer,
                Send(good.clone()),
            ],
            vec![NO, NO, AUTH],
        ),
        no_gss(
            "SSLRequest, GSSENCRequest, startup",
            vec![
                Send(ssl_request()),
                Answer,
                Send(gssenc_request()),
                Answer,
                Send(good.clone()),
            ],
            vec![NO, NO, AUTH],
        ),
        no_gss(
            "SSLRequest, GSSENCRequest, SSLRequest",
            vec![
                Send(ssl_request()),
                Answer,
                Send(gssenc_request()),
                Answer,
                Send(ssl_request()),
            ],
            vec![NO, NO, fatal("0A000"), CLOSED],
        ),
        case("SSLRequest with a body", vec![Send(startup_raw(80877103, b"xyz"))]),
        no_gss(
            "GSSENCRequest with a body",
            vec![Send(startup_raw(80877104, b"xyz"))],
            vec![NO, LATE_CLOSE],
        ),
        case(
            "SSLRequest, protocol 2.0",
            vec![Send(ssl_request()), Answer, Send(startup(v2, &[("user", "u")]))],
        ),
        case(
            "SSLRequest, garbage",
            vec![Send(ssl_request()), Answer, Send(vec![0xff; 8])],
        ),
        case(
            "SSLRequest, half a startup, close",
            vec![Send(ssl_request()), Answer, Send(good[..5].to_vec()), Shut],
        ),
        // --- CancelRequest
        case(
            "CancelRequest unknown key",
            vec![Send(cancel_request(1, &[1, 2, 3, 4]))],
        ),
        case("CancelRequest 32-byte key", vec![Send(cancel_request(1, &[7; 32]))]),
        case(
            "CancelRequest short (no key)",
            vec![Send(startup_raw(CANCEL_REQUEST, &[0, 0, 0, 1]))],
        ),
        case("CancelRequest empty", vec![Send(startup_raw(CANCEL_REQUEST, b""))]),
        case("CancelRequest 300-byte key", vec![Send(cancel_request(1, &[7; 300]))]),
        case(
            "CancelRequest + startup pipelined",
            vec![Send(cat(&[&cancel_request(1, &[1, 2, 3, 4]), &good]))],
        ),
        case(
            "SSLRequest, CancelRequest",
            vec![Send(ssl_request()), Answer, Send(cancel_request(1, &[1, 2, 3, 4]))],
        ),
        case(
            "CancelRequest, close",
            vec![Send(cancel_request(1, &[1, 2, 3, 4])), Shut],
        ),
        // --- bytes pipelined after the startup
        case("startup + Terminate", vec![Send(cat(&[&good, &terminate()]))]),
        case("startup + garbage", vec![Send(cat(&[&good, &[0xff; 16]]))]),
        case("startup, close", vec![Send(good.clone()), Shut]),
        case(
            "missing user + Terminate",
            vec![Send(cat(&[&startup(V3_0, &[("database", db)]), &terminate()]))],
        ),
        case(
            "protocol 2.0 + Terminate",
            vec![Send(cat(&[&startup(v2, &[("user", "u")]), &terminate()]))],
        ),
    ]
}

/// A parameter area of exactly `n` bytes: user, then one long application_name, terminator.
fn big_params(n: usize) -> Vec<u8> {
    let head = b"user\0u\0application_name\0";
    let mut v = head.to_vec();
    v.resize(n - 2, b'a');
    v.extend_from_slice(b"\0\0");
    assert_eq!(v.len(), n);
    v
}

// --- observing ---------------------------------------------------------------------------------

struct Observer {
    io: TcpStream,
    buf: BytesMut,
    started: Instant,
    eof: bool,
}

impl Observer {
    /// At least `n` bytes buffered, or false at EOF / the deadline.
    async fn want(&mut self, n: usize, deadline: tokio::time::Instant) -> Result<bool, Tok> {
        while self.buf.len() < n {
            if self.eof {
                return Ok(false);
            }
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buf)).await {
                Err(_) => return Err(Tok::Open),
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(_)) => {}
            }
        }
        Ok(true)
    }

    fn closed(&self) -> Tok {
        Tok::Closed {
            late: self.started.elapsed() >= LATE,
        }
    }

    /// The next observable thing.
    async fn next(&mut self, deadline: tokio::time::Instant) -> Tok {
        match self.want(1, deadline).await {
            Err(t) => return t,
            Ok(false) => return self.closed(),
            Ok(true) => {}
        }
        let tag = self.buf[0];
        match tag {
            // Before authentication a message never starts with these: the answers to requests.
            b'N' | b'S' | b'G' => {
                self.buf.advance(1);
                return Tok::Byte(tag as char);
            }
            _ => {}
        }
        match self.want(2, deadline).await {
            Err(t) => return t,
            Ok(false) => return Tok::Other('?'),
            Ok(true) => {}
        }
        if tag == b'E' && self.buf[1] != 0 {
            // Protocol 2: text up to a NUL.
            loop {
                if let Some(nul) = self.buf[1..].iter().position(|b| *b == 0) {
                    let text = String::from_utf8_lossy(&self.buf[1..1 + nul]).into_owned();
                    self.buf.advance(nul + 2);
                    let severity = text.split(':').next().unwrap_or("").to_string();
                    let well_formed = text.starts_with(&format!("{severity}:  ")) && text.ends_with('\n');
                    return Tok::ErrorV2 { severity, well_formed };
                }
                let have = self.buf.len();
                match self.want(have + 1, deadline).await {
                    Err(t) => return t,
                    Ok(false) => return Tok::Other('?'),
                    Ok(true) => {}
                }
            }
        }
        match self.want(5, deadline).await {
            Err(t) => return t,
            Ok(false) => return Tok::Other('?'),
            Ok(true) => {}
        }
        let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
        match self.want(1 + len, deadline).await {
            Err(t) => return t,
            Ok(false) => return Tok::Other('?'),
            Ok(true) => {}
        }
        let m = self.buf.split_to(1 + len);
        let body = &m[5..];
        match tag {
            b'E' => {
                let fields = wire::Msg {
                    tag,
                    body: body.to_vec(),
                }
                .fields();
                Tok::Error {
                    severity: fields.get(&'V').or(fields.get(&'S')).cloned().unwrap_or_default(),
                    code: fields.get(&'C').cloned().unwrap_or_default(),
                }
            }
            b'v' => Tok::Negotiate,
            b'R' => Tok::Auth {
                ok: body.len() >= 4 && body[..4] == [0, 0, 0, 0],
            },
            other => Tok::Other(other as char),
        }
    }
}

/// Runs `acts` against `port` and returns what the client saw.
async fn observe(port: u16, acts: &[Act]) -> Vec<Tok> {
    let io = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    io.set_nodelay(true).unwrap();
    let mut o = Observer {
        io,
        buf: BytesMut::new(),
        started: Instant::now(),
        eof: false,
    };
    let deadline = tokio::time::Instant::now() + OBSERVE;
    let mut seen = Vec::new();
    for act in acts {
        match act {
            // A write to a server that already closed may fail or not: what it read decides.
            Act::Send(bytes) => {
                let _ = o.io.write_all(bytes).await;
            }
            Act::Shut => {
                let _ = o.io.shutdown().await;
            }
            Act::Answer => {
                let t = o.next(deadline).await;
                let end = t.terminal();
                seen.push(t);
                if end {
                    return seen;
                }
            }
        }
    }
    loop {
        let t = o.next(deadline).await;
        let end = t.terminal();
        seen.push(t);
        if end {
            return seen;
        }
    }
}

/// What dbward must show, given what Postgres showed.
fn expected_from_dbward(pg: &[Tok], deliberate: Option<&Deliberate>) -> Vec<Tok> {
    // dbward authenticates the client at once (AuthenticationOk) and logs in upstream with the
    // Vault-issued role: where Postgres asks for a password, dbward says Ok.
    let mut want: Vec<Tok> = pg
        .iter()
        .map(|t| match t {
            Tok::Auth { .. } => Tok::Auth { ok: true },
            t => t.clone(),
        })
        .collect();
    match deliberate {
        None => {}
        Some(Deliberate::NewerMinor) => want.retain(|t| *t != Tok::Negotiate),
        Some(Deliberate::Replication) => want = vec![fatal("0A000"), CLOSED],
        Some(Deliberate::NoGssEncryption(without_gss)) => want = without_gss.clone(),
        Some(Deliberate::RefusedUpstream(code)) => {
            assert!(
                matches!(pg.last(), Some(Tok::Auth { .. })),
                "Postgres went on to authenticate: {pg:?}"
            );
            want = vec![fatal(code), CLOSED]
        }
    }
    want
}

fn show(acts: &[Act]) -> String {
    acts.iter()
        .map(|a| match a {
            Act::Send(b) if b.len() > 48 => format!("send {:02x?}...({} bytes)", &b[..48], b.len()),
            Act::Send(b) => format!("send {b:02x?}"),
            Act::Answer => "answer".into(),
            Act::Shut => "shut".into(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Postgres closes a stalled startup after [`STALL`], as dbward does with the same `startup_timeout`.
fn short_postgres_timeout(s: &Servers) {
    let secs = STALL.as_secs();
    s.pg_exec(
        "postgres",
        &format!("alter system set authentication_timeout = '{secs}s'"),
    );
    s.pg_exec("postgres", "select pg_reload_conf()");
    wait_until(Duration::from_secs(10), "authentication_timeout set", || {
        let v = s.pg_exec("postgres", "show authentication_timeout");
        if v == format!("{secs}s") {
            Ok(())
        } else {
            Err(v)
        }
    });
}

/// Runs every case against both servers (a few at a time) and returns the mismatches.
async fn compare(pg_port: u16, dbward_port: u16, cases: Vec<Case>) -> (usize, Vec<String>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for c in cases {
        let limit = limit.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.unwrap();
            let (pg, ours) = tokio::join!(observe(pg_port, &c.acts), observe(dbward_port, &c.acts));
            let want = expected_from_dbward(&pg, c.deliberate.as_ref());
            (c, pg, ours, want)
        }));
    }
    let mut failures = Vec::new();
    let n = tasks.len();
    for t in tasks {
        let (c, pg, ours, want) = t.await.unwrap();
        if ours != want {
            failures.push(format!(
                "{}: {}\n    postgres: {pg:?}\n    dbward:   {ours:?}\n    expected: {want:?}",
                c.name,
                show(&c.acts)
            ));
        } else {
            eprintln!("ok  {:<50} {pg:?}", c.name);
        }
    }
    (n, failures)
}

/// dbward with the same startup timeout, its credential fetched and its SCRAM keys derived
/// by one login: the short `authentication_timeout` also bounds dbward's own upstream logins,
/// which must not all wait for the first Vault read at once. Returns dbward and its admin port.
async fn start_dbward(app: &TestApp) -> (Dbward, u16) {
    let config = app
        .config("static")
        .with_admin()
        .proxy("startup_timeout", &format!("{}s", STALL.as_secs()));
    let d = Dbward::start(&config);
    let hello = observe(d.port(), &[Act::Send(startup(V3_0, &[("user", "warm-up")]))]).await;
    assert_eq!(hello, [AUTH], "warm-up login through dbward:\n{}", d.log_contents());
    (d, config.admin_port())
}

/// `dbward_client_startup_errors_total` for `reason`, from dbward's /metrics.
fn startup_errors(admin_port: u16, database: &str, reason: &str) -> f64 {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let body = agent
        .get(&format!("http://127.0.0.1:{}/metrics", admin_port))
        .call()
        .expect("GET /metrics")
        .into_string()
        .unwrap();
    let want = format!("dbward_client_startup_errors_total{{database=\"{database}\",reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(want.as_str()))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn every_table_sequence_is_answered_as_postgres_answers_it() {
    let (s, _g, app) = shared_app("conformance_table");
    short_postgres_timeout(s);
    let (d, admin) = start_dbward(&app).await;
    let cases = table(&app.dbname);
    let (n, failures) = compare(s.pg_port(), d.port(), cases).await;
    assert!(
        failures.is_empty(),
        "{} of {n} sequences differ from Postgres:\n{}\n--- dbward log:\n{}",
        failures.len(),
        failures.join("\n"),
        d.log_contents()
    );
    eprintln!("conformance: {n} sequences answered as Postgres answers them");

    // What dbward cannot tell the client it logs (with the peer) and counts.
    for reason in [
        "invalid_length",
        "incomplete",
        "timeout",
        "invalid_cancel",
        "unsupported_protocol",
        "invalid_packet",
        "unencrypted_data",
        "missing_user",
        "invalid_parameter",
    ] {
        assert!(startup_errors(admin, &app.tag, reason) >= 1.0, "no {reason} counted");
    }
    let log = d.log_contents();
    let line = log
        .lines()
        .find(|l| l.contains("invalid length of startup packet"))
        .expect("the invalid length is logged");
    assert!(
        line.contains("peer=127.0.0.1:") && line.contains("reason=\"invalid_length\""),
        "{line}"
    );
}

/// splitmix64: a tiny seeded generator, so a failing case can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
}

/// A StartupMessage from the table's grammar: a version (no 3.1/3.2, whose difference is
/// deliberate), some of the parameters the table uses (repeats and an empty user included;
/// no names the server would refuse after authentication), maybe one layout fault.
fn gen_startup(rng: &mut Rng, db: &str) -> Vec<u8> {
    let version = rng.pick(&[
        V3_0,
        V3_0,
        V3_0,
        V3_0,
        V3_0,
        (3 << 16) | 9999,
        2 << 16,
        (2 << 16) | 5,
        1 << 16,
        1,
        0,
        4 << 16,
    ]);
    let candidates = [
        ("user", "u"),
        ("user", "u"),
        ("database", db),
        ("application_name", "fz"),
        ("user", ""),
        ("options", ""),
        ("_pq_.x", "1"),
        ("user", "v"),
    ];
    let mut area = Vec::new();
    for (k, v) in candidates {
        if rng.chance(2) {
            area.extend_from_slice(k.as_bytes());
            area.push(0);
            area.extend_from_slice(v.as_bytes());
            area.push(0);
        }
    }
    area.push(0);
    match rng.below(8) {
        0 => {
            area.pop();
        }
        1 => area.push(rng.pick(&[b'x', 0])),
        2 => area.insert(0, 0),
        _ => {}
    }
    startup_raw(version, &area)
}

/// One piece of a sequence.
fn gen_piece(rng: &mut Rng, db: &str) -> Vec<u8> {
    match rng.below(8) {
        0..=2 => gen_startup(rng, db),
        3 => ssl_request(),
        4 => cancel_request(rng.below(1 << 20) as i32, &vec![7; rng.pick(&[0, 2, 4, 32, 300])]),
        5 => {
            let len = rng.pick(&[0u32, 4, 7, 10_005, 0x7fff_ffff, u32::MAX]);
            raw_packet(len, &vec![0; rng.below(12)])
        }
        6 => terminate(),
        // Garbage whose first byte makes the length invalid (a valid-looking layout of random
        // names would be the server's to refuse, after authentication).
        _ => {
            let mut g = vec![1 + rng.below(255) as u8];
            g.extend((0..rng.below(16)).map(|_| rng.next() as u8));
            g
        }
    }
}

/// A sequence: one to three pieces, each pipelined with the next or followed by a wait for the
/// answer; the last write maybe cut short; then a stall or a close.
fn gen_case(rng: &mut Rng, db: &str, name: String) -> Case {
    let mut acts = Vec::new();
    let mut pending = Vec::new();
    let n = 1 + rng.below(3);
    for i in 0..n {
        pending.extend(gen_piece(rng, db));
        if i + 1 < n && rng.chance(2) {
            acts.push(Send(std::mem::take(&mut pending)));
            acts.push(Answer);
        }
    }
    if pending.len() > 1 && rng.chance(4) {
        let keep = 1 + rng.below(pending.len() - 1);
        pending.truncate(keep);
    }
    acts.push(Send(pending));
    if rng.chance(3) {
        acts.push(Shut);
    }
    case(&name, acts)
}

fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}"))
        }
        Err(_) => default,
    }
}

#[tokio::test]
async fn generated_sequences_are_answered_as_postgres_answers_them() {
    let seed = env_or("DBWARD_CONFORMANCE_SEED", 0x5eed_0015);
    let count = env_or("DBWARD_CONFORMANCE_CASES", 40) as usize;
    let (s, _g, app) = shared_app("conformance_fuzz");
    short_postgres_timeout(s);
    let (d, _) = start_dbward(&app).await;
    let mut rng = Rng(seed);
    let cases: Vec<Case> = (0..count)
        .map(|i| gen_case(&mut rng, &app.dbname, format!("generated #{i}")))
        .collect();
    let (n, failures) = compare(s.pg_port(), d.port(), cases).await;
    assert!(
        failures.is_empty(),
        "{} of {n} generated sequences differ from Postgres (rerun with DBWARD_CONFORMANCE_SEED={seed:#x} DBWARD_CONFORMANCE_CASES={count}):\n{}\n--- dbward log:\n{}",
        failures.len(),
        failures.join("\n"),
        d.log_contents()
    );
    eprintln!("conformance: {n} generated sequences (seed {seed:#x}) answered as Postgres answers them");
}
