//! SCRAM-SHA-256 and SCRAM-SHA-256-PLUS client (RFC 5802, RFC 7677) as Postgres speaks it,
//! sans-IO: the caller moves messages, this module only computes and checks them.
//!
//! Written here rather than taken from `postgres-protocol` because that implementation keeps the
//! password and the salted password in plain buffers; here every derived key is zeroized on drop.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// The mechanism names Postgres offers in AuthenticationSASL.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Highest PBKDF2 iteration count accepted from a server. Postgres defaults to 4096 and real
/// deployments stay far below this (it is OWASP's 2023 figure for PBKDF2-HMAC-SHA256); the cap
/// exists because the count comes from the server, and an unbounded one would let a hostile or
/// spoofed server burn seconds of our CPU per connection attempt.
pub const MAX_ITERATIONS: u32 = 600_000;

/// Server SCRAM messages are ~100 bytes; anything far larger is not a real server.
const MAX_MESSAGE_LEN: usize = 4096;

/// Random bytes in our nonce (libpq uses 18 as well).
const NONCE_BYTES: usize = 18;

/// Why the exchange failed. Never contains the password or a derived key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScramError(pub String);

fn fail<T>(message: impl Into<String>) -> Result<T, ScramError> {
    Err(ScramError(message.into()))
}

/// What the client says about channel binding in its GS2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelBinding {
    /// `n`: no TLS, or a certificate whose hash we cannot determine.
    Unsupported,
    /// `y`: we could bind but the server did not offer -PLUS. A server that does support it
    /// then refuses the login, which is the downgrade protection.
    NotOffered,
    /// `p=tls-server-end-point`: the RFC 5929 hash of the server's certificate.
    TlsServerEndPoint(Vec<u8>),
}

impl ChannelBinding {
    fn gs2_header(&self) -> &'static str {
        match self {
            ChannelBinding::Unsupported => "n,,",
            ChannelBinding::NotOffered => "y,,",
            ChannelBinding::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    /// The `c=` attribute value: base64 of the GS2 header followed by the binding data.
    fn c_attribute(&self) -> String {
        let mut input = self.gs2_header().as_bytes().to_vec();
        if let ChannelBinding::TlsServerEndPoint(hash) = self {
            input.extend_from_slice(hash);
        }
        B64.encode(input)
    }

    /// The SASL mechanism name that goes with this binding.
    pub fn mechanism(&self) -> &'static str {
        match self {
            ChannelBinding::TlsServerEndPoint(_) => SCRAM_SHA_256_PLUS,
            _ => SCRAM_SHA_256,
        }
    }
}

enum State {
    /// client-first sent, waiting for server-first.
    Started,
    /// client-final sent; holds what is needed to check the server's signature.
    Proved {
        server_key: Zeroizing<[u8; 32]>,
        auth_message: String,
    },
    /// The server proved it knows the password too.
    Verified,
    /// An error happened; nothing further is accepted.
    Failed,
}

/// The salted password of one credential, kept between connections: PBKDF2 is most of the CPU
/// an upstream login costs, and for a given password, salt and iteration count its result never
/// changes. Holds one entry (a credential's salt is fixed); wiped on drop.
#[derive(Default)]
pub struct KeyCache {
    entry: std::sync::Mutex<Option<CachedKey>>,
}

struct CachedKey {
    salt: Vec<u8>,
    iterations: u32,
    salted: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyCache([REDACTED])")
    }
}

impl KeyCache {
    fn salted_password(&self, password: &[u8], salt: &[u8], iterations: u32) -> Zeroizing<[u8; 32]> {
        if let Some(c) = self.entry.lock().unwrap().as_ref() {
            if c.salt == salt && c.iterations == iterations {
                return c.salted.clone();
            }
        }
        let mut salted = Zeroizing::new([0u8; 32]);
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut *salted);
        *self.entry.lock().unwrap() = Some(CachedKey {
            salt: salt.to_vec(),
            iterations,
            salted: salted.clone(),
        });
        salted
    }

    /// Whether PBKDF2 would be skipped for this salt and iteration count.
    pub fn holds(&self, salt: &[u8], iterations: u32) -> bool {
        self.entry
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|c| c.salt == salt && c.iterations == iterations)
    }
}

/// One SCRAM-SHA-256 exchange.
pub struct ScramClient {
    password: Zeroizing<Vec<u8>>,
    keys: std::sync::Arc<KeyCache>,
    nonce: String,
    client_first_bare: String,
    channel_binding: ChannelBinding,
    state: State,
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Started => "started",
            State::Proved { .. } => "proved",
            State::Verified => "verified",
            State::Failed => "failed",
        };
        f.debug_struct("ScramClient")
            .field("mechanism", &self.channel_binding.mechanism())
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    /// A client with a fresh random nonce and an empty user name, as Postgres expects (it takes
    /// the user from the StartupMessage and ignores the SCRAM one).
    ///
    /// The password is used as-is, without SASLprep: Postgres itself falls back to the raw bytes
    /// when SASLprep fails, and Vault-generated passwords are ASCII, for which SASLprep is the
    /// identity.
    pub fn new(password: &[u8], channel_binding: ChannelBinding) -> Self {
        let mut raw = [0u8; NONCE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        Self::with_nonce("", password, B64.encode(raw), channel_binding)
    }

    /// [`Self::new`] reusing (and filling) `keys`, the salted password of this credential.
    pub fn with_keys(password: &[u8], channel_binding: ChannelBinding, keys: std::sync::Arc<KeyCache>) -> Self {
        let mut client = Self::new(password, channel_binding);
        client.keys = keys;
        client
    }

    /// A client with a given user name and nonce, for test vectors.
    pub fn with_nonce(user: &str, password: &[u8], nonce: String, channel_binding: ChannelBinding) -> Self {
        let user = user.replace('=', "=3D").replace(',', "=2C");
        ScramClient {
            password: Zeroizing::new(password.to_vec()),
            keys: Default::default(),
            client_first_bare: format!("n={user},r={nonce}"),
            nonce,
            channel_binding,
            state: State::Started,
        }
    }

    /// The SASL mechanism to name in SASLInitialResponse.
    pub fn mechanism(&self) -> &'static str {
        self.channel_binding.mechanism()
    }

    /// client-first-message, the data of SASLInitialResponse.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.channel_binding.gs2_header(), self.client_first_bare).into_bytes()
    }

    /// Takes server-first-message (SASLContinue data), returns client-final-message.
    /// Runs PBKDF2, so it can take a while at high iteration counts.
    pub fn handle_server_first(&mut self, message: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::Started) {
            self.state = State::Failed;
            return fail("unexpected SCRAM server-first message");
        }
        self.state = State::Failed;
        let server_first = text(message, "server-first")?;
        let mut attrs = server_first.split(',');
        if server_first.starts_with("m=") {
            return fail("server requires a SCRAM extension dbward does not support");
        }
        let server_nonce = attr(attrs.next(), 'r', "server-first")?;
        let salt = attr(attrs.next(), 's', "server-first")?;
        let iterations = attr(attrs.next(), 'i', "server-first")?;

        if !server_nonce.starts_with(&self.nonce) || server_nonce.len() == self.nonce.len() {
            return fail("SCRAM server nonce does not extend the client nonce");
        }
        if !server_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return fail("SCRAM server nonce contains invalid characters");
        }
        let salt = match B64.decode(salt) {
            Ok(s) if !s.is_empty() => s,
            _ => return fail("SCRAM salt is not valid base64"),
        };
        let iterations: u32 = match iterations.parse() {
            Ok(0) | Err(_) => return fail(format!("invalid SCRAM iteration count {iterations:?}")),
            Ok(n) if n > MAX_ITERATIONS => {
                return fail(format!(
                    "server asks for {n} SCRAM iterations; dbward allows at most {MAX_ITERATIONS}"
                ))
            }
            Ok(n) => n,
        };

        let salted = self.keys.salted_password(&self.password, &salt, iterations);
        let client_key = Zeroizing::new(hmac(&*salted, b"Client Key"));
        let stored_key = Zeroizing::new(<[u8; 32]>::from(Sha256::digest(&client_key[..])));
        let server_key = Zeroizing::new(hmac(&*salted, b"Server Key"));

        let without_proof = format!("c={},r={server_nonce}", self.channel_binding.c_attribute());
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = Zeroizing::new(hmac(&*stored_key, auth_message.as_bytes()));
        let mut proof = Zeroizing::new([0u8; 32]);
        for (p, (k, s)) in proof.iter_mut().zip(client_key.iter().zip(client_signature.iter())) {
            *p = k ^ s;
        }
        let client_final = format!("{without_proof},p={}", B64.encode(&proof[..]));
        self.state = State::Proved {
            server_key,
            auth_message,
        };
        Ok(client_final.into_bytes())
    }

    /// Takes server-final-message (SASLFinal data) and checks the server's signature.
    pub fn handle_server_final(&mut self, message: &[u8]) -> Result<(), ScramError> {
        let State::Proved {
            server_key,
            auth_message,
        } = std::mem::replace(&mut self.state, State::Failed)
        else {
            return fail("unexpected SCRAM server-final message");
        };
        let server_final = text(message, "server-final")?;
        let first = server_final.split(',').next().unwrap_or("");
        if let Some(e) = first.strip_prefix("e=") {
            return fail(format!("server reported SCRAM error {e:?}"));
        }
        let verifier = attr(Some(first), 'v', "server-final")?;
        let Ok(signature) = B64.decode(verifier) else {
            return fail("SCRAM server signature is not valid base64");
        };
        let mut mac = HmacSha256::new_from_slice(&*server_key).expect("HMAC takes any key length");
        mac.update(auth_message.as_bytes());
        // verify_slice compares in constant time.
        if mac.verify_slice(&signature).is_err() {
            return fail("SCRAM server signature is wrong: the server does not know the password (or the connection was intercepted)");
        }
        self.state = State::Verified;
        Ok(())
    }

    /// True once the server's signature has been verified.
    pub fn is_verified(&self) -> bool {
        matches!(self.state, State::Verified)
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn text<'a>(message: &'a [u8], what: &str) -> Result<&'a str, ScramError> {
    if message.len() > MAX_MESSAGE_LEN {
        return fail(format!("SCRAM {what} message is too long ({} bytes)", message.len()));
    }
    std::str::from_utf8(message).map_err(|_| ScramError(format!("SCRAM {what} message is not UTF-8")))
}

fn attr<'a>(part: Option<&'a str>, name: char, what: &str) -> Result<&'a str, ScramError> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or_else(|| ScramError(format!("malformed SCRAM {what} message: expected attribute {name}=")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str =
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_client() -> ScramClient {
        ScramClient::with_nonce("user", b"pencil", NONCE.into(), ChannelBinding::Unsupported)
    }

    #[test]
    fn rfc7677_vector() {
        let mut c = rfc_client();
        assert_eq!(c.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        assert_eq!(c.mechanism(), "SCRAM-SHA-256");
        let client_final = c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(std::str::from_utf8(&client_final).unwrap(), CLIENT_FINAL);
        assert!(!c.is_verified());
        c.handle_server_final(SERVER_FINAL.as_bytes()).unwrap();
        assert!(c.is_verified());
    }

    #[test]
    fn cached_salted_password_gives_the_same_proof_and_skips_pbkdf2() {
        let keys = std::sync::Arc::new(KeyCache::default());
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        for round in 0..2 {
            assert_eq!(keys.holds(&salt, 4096), round == 1);
            let mut c = rfc_client();
            c.keys = keys.clone();
            let client_final = c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
            assert_eq!(std::str::from_utf8(&client_final).unwrap(), CLIENT_FINAL);
            c.handle_server_final(SERVER_FINAL.as_bytes()).unwrap();
        }
        // Another salt (the password was rotated server-side) is computed afresh.
        assert!(!keys.holds(b"other", 4096));
        assert!(!keys.holds(&salt, 8192));
        assert_eq!(format!("{keys:?}"), "KeyCache([REDACTED])");
    }

    #[test]
    fn a_new_salt_every_connection_costs_one_pbkdf2_each_and_one_cache_slot() {
        // A hostile server that sends a fresh salt each time: each connection computes PBKDF2
        // once (nothing held for that salt before it, the one slot holds it after), and the
        // cache never holds more than the latest salt.
        let keys = std::sync::Arc::new(KeyCache::default());
        let mut previous: Option<Vec<u8>> = None;
        for n in 0..5u8 {
            let salt = vec![n; 16];
            assert!(!keys.holds(&salt, 4096));
            let mut c = rfc_client();
            c.keys = keys.clone();
            let first = format!("r={}srv,s={},i=4096", c.nonce, B64.encode(&salt));
            c.handle_server_first(first.as_bytes()).unwrap();
            assert!(keys.holds(&salt, 4096));
            if let Some(p) = previous.replace(salt) {
                assert!(!keys.holds(&p, 4096), "only the latest salt is kept");
            }
        }
    }

    #[test]
    fn wrong_server_signature_is_refused() {
        let mut c = rfc_client();
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        let e = c
            .handle_server_final(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap_err();
        assert!(e.0.contains("signature is wrong"), "{e}");
        assert!(!c.is_verified());
        // A failed exchange cannot be continued.
        assert!(c.handle_server_final(SERVER_FINAL.as_bytes()).is_err());
    }

    #[test]
    fn server_error_and_garbage_final_are_refused() {
        let mut c = rfc_client();
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        let e = c.handle_server_final(b"e=invalid-proof").unwrap_err();
        assert!(e.0.contains("invalid-proof"), "{e}");
        let mut c = rfc_client();
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert!(c.handle_server_final(b"x=1").is_err());
    }

    #[test]
    fn nonce_must_extend_ours() {
        let mut c = rfc_client();
        let other = SERVER_FIRST.replace("r=rOprNG", "r=XOprNG");
        let e = c.handle_server_first(other.as_bytes()).unwrap_err();
        assert!(e.0.contains("nonce"), "{e}");
        // Echoing our nonce without adding to it is not allowed either.
        let mut c = rfc_client();
        let echo = format!("r={NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096");
        assert!(c.handle_server_first(echo.as_bytes()).is_err());
    }

    #[test]
    fn iteration_count_is_bounded() {
        for bad in ["0", "-1", "x", "600001", "4294967296"] {
            let mut c = rfc_client();
            let msg = SERVER_FIRST.replace("i=4096", &format!("i={bad}"));
            let e = c.handle_server_first(msg.as_bytes()).unwrap_err();
            assert!(e.0.contains("iteration"), "{bad}: {e}");
        }
    }

    #[test]
    fn malformed_server_first_is_refused() {
        for bad in [
            "",
            "s=abc,r=x,i=1",
            "m=ext,r=rOprNGfwEbeRWgbNEkqOx,s=AA==,i=1",
            "r=rOprNGfwEbeRWgbNEkqOx,s=!!,i=1",
        ] {
            assert!(rfc_client().handle_server_first(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(rfc_client().handle_server_first(&vec![b'a'; 10_000]).is_err());
    }

    #[test]
    fn postgres_style_first_message_and_binding_headers() {
        let c = ScramClient::new(b"pw", ChannelBinding::NotOffered);
        let first = String::from_utf8(c.client_first()).unwrap();
        assert!(first.starts_with("y,,n=,r="), "{first}");
        assert_eq!(first.len(), "y,,n=,r=".len() + 24);
        let p = ScramClient::new(b"pw", ChannelBinding::TlsServerEndPoint(vec![1, 2, 3]));
        assert_eq!(p.mechanism(), "SCRAM-SHA-256-PLUS");
        assert!(p.client_first().starts_with(b"p=tls-server-end-point,,n=,r="));
        assert_eq!(
            ChannelBinding::TlsServerEndPoint(vec![1, 2, 3]).c_attribute(),
            B64.encode(b"p=tls-server-end-point,,\x01\x02\x03")
        );
    }

    #[test]
    fn debug_shows_no_secrets() {
        let mut c = rfc_client();
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains("pencil") && !d.contains(NONCE), "{d}");
    }
}
