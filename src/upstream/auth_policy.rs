//! libpq's `require_auth` and `channel_binding`, per database entry, with libpq's meaning
//! (fe-connect.c parses the list, fe-auth.c `check_expected_areq` enforces it):
//!
//! - `require_auth = "scram-sha-256"` (or a list such as `"scram-sha-256,md5"`): the server must
//!   use one of the listed methods, and must complete it before AuthenticationOk; `none` in the
//!   list also admits a server that asks for no authentication at all (trust).
//! - `require_auth = "!password,!md5"`: the server must not use the listed methods; `!none`
//!   demands that it authenticate somehow. Negated and plain methods cannot be mixed.
//! - `channel_binding = "require"`: only SCRAM-SHA-256-PLUS over TLS (tls-server-end-point); any
//!   other request, or an AuthenticationOk without a bound exchange, is refused. `"disable"`
//!   never binds; `"prefer"` (the default) binds whenever the server offers -PLUS.
//!
//! The point for dbward: a server that answers the StartupMessage with AuthenticationOk at once
//! (an impostor, or a misconfigured `trust`) is refused when the entry asks for authentication,
//! instead of getting the client's queries.

use std::fmt;

/// Authentication methods as require_auth names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Password,
    Md5,
    Gss,
    Sspi,
    ScramSha256,
}

impl Method {
    const ALL: [Method; 5] = [
        Method::Password,
        Method::Md5,
        Method::Gss,
        Method::Sspi,
        Method::ScramSha256,
    ];

    fn name(self) -> &'static str {
        match self {
            Method::Password => "password",
            Method::Md5 => "md5",
            Method::Gss => "gss",
            Method::Sspi => "sspi",
            Method::ScramSha256 => "scram-sha-256",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A validated `require_auth`. The default (unset) admits every method and no authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequireAuth {
    /// The setting as written, for messages; empty when unset.
    text: String,
    /// Bit per [`Method`].
    allowed: u8,
    /// The server must complete some authentication before AuthenticationOk.
    auth_required: bool,
}

impl Default for RequireAuth {
    fn default() -> Self {
        RequireAuth {
            text: String::new(),
            allowed: Method::ALL.iter().fold(0, |m, x| m | x.bit()),
            auth_required: false,
        }
    }
}

impl fmt::Display for RequireAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl RequireAuth {
    /// Parses libpq's syntax; the error is the text after the key in the config error.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(RequireAuth::default());
        }
        let negated = text.starts_with('!');
        let mut policy = RequireAuth {
            text: text.to_string(),
            allowed: if negated { RequireAuth::default().allowed } else { 0 },
            auth_required: !negated,
        };
        let mut seen: Vec<&str> = Vec::new();
        for item in text.split(',') {
            let (neg, name) = match item.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, item),
            };
            if neg != negated {
                return Err(format!(
                    "{text:?}: negative method {:?} cannot be mixed with non-negative ones (write all with '!' or none)",
                    if neg { item } else { name }
                ));
            }
            if seen.contains(&name) {
                return Err(format!("{text:?}: method {name:?} is listed more than once"));
            }
            seen.push(name);
            if name == "none" {
                // Positive: trust is acceptable. Negated: some authentication is required.
                policy.auth_required = negated;
                continue;
            }
            let Some(method) = Method::ALL.iter().find(|m| m.name() == name) else {
                return Err(format!(
                    "{text:?}: unknown method {name:?}, expected a comma-separated list of password, md5, gss, sspi, scram-sha-256, none (each optionally prefixed with '!')"
                ));
            };
            if negated {
                policy.allowed &= !method.bit();
            } else {
                policy.allowed |= method.bit();
            }
        }
        Ok(policy)
    }

    pub fn is_set(&self) -> bool {
        !self.text.is_empty()
    }

    fn allows(&self, m: Method) -> bool {
        self.allowed & m.bit() != 0
    }
}

/// `channel_binding`, as in libpq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBindingMode {
    Disable,
    #[default]
    Prefer,
    Require,
}

/// One entry's authentication policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthPolicy {
    pub require_auth: RequireAuth,
    pub channel_binding: ChannelBindingMode,
}

/// An authentication request from the server, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    Ok,
    Password,
    Md5,
    /// SASL, SASLContinue, SASLFinal.
    Sasl,
    Gss,
    Sspi,
    /// Kerberos V5, SCM credential and anything else.
    Other,
}

/// How far the exchange got when the server sent a request.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Progress {
    /// dbward sent the password (or its hash), or the SCRAM server signature checked out.
    pub finished: bool,
    /// The SCRAM exchange used SCRAM-SHA-256-PLUS and the server signature checked out.
    pub bound: bool,
}

impl AuthPolicy {
    /// libpq's `check_expected_areq`: Err is the reason, for the refusal message.
    pub(crate) fn check(&self, request: Request, progress: Progress) -> Result<(), String> {
        let ra = &self.require_auth;
        if ra.is_set() {
            let method = match request {
                Request::Ok => {
                    if ra.auth_required && !progress.finished {
                        return Err(self.require_auth_failed("server did not complete authentication"));
                    }
                    None
                }
                Request::Password => Some(Method::Password),
                Request::Md5 => Some(Method::Md5),
                Request::Sasl => Some(Method::ScramSha256),
                Request::Gss => Some(Method::Gss),
                Request::Sspi => Some(Method::Sspi),
                Request::Other => {
                    return Err(self.require_auth_failed("server requested an unsupported authentication method"))
                }
            };
            if let Some(m) = method.filter(|m| !ra.allows(*m)) {
                return Err(self.require_auth_failed(&format!("server requested {} authentication", describe(m))));
            }
        }
        if self.channel_binding == ChannelBindingMode::Require {
            match request {
                Request::Sasl => {}
                Request::Ok if !progress.bound => {
                    return Err(
                        "channel binding required (channel_binding = \"require\"), but server authenticated without channel binding"
                            .into(),
                    )
                }
                Request::Ok => {}
                _ => {
                    return Err(
                        "channel binding required (channel_binding = \"require\"), but the server's authentication request does not support it"
                            .into(),
                    )
                }
            }
        }
        Ok(())
    }

    fn require_auth_failed(&self, reason: &str) -> String {
        format!(
            "authentication method requirement \"{}\" failed: {reason}",
            self.require_auth
        )
    }
}

fn describe(m: Method) -> &'static str {
    match m {
        Method::Password => "a cleartext password",
        Method::Md5 => "a hashed password (md5)",
        Method::Gss => "GSSAPI",
        Method::Sspi => "SSPI",
        Method::ScramSha256 => "SASL (scram-sha-256)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(require_auth: &str, cb: ChannelBindingMode) -> AuthPolicy {
        AuthPolicy {
            require_auth: RequireAuth::parse(require_auth).unwrap(),
            channel_binding: cb,
        }
    }

    const DONE: Progress = Progress {
        finished: true,
        bound: false,
    };
    const NOTHING: Progress = Progress {
        finished: false,
        bound: false,
    };

    #[test]
    fn parsing_follows_libpq() {
        for bad in [
            "scram-sha-256,!md5",
            "!md5,password",
            "md5,md5",
            "!none,!none",
            "kerberos",
            "scram-sha-256,",
            "SCRAM-SHA-256",
        ] {
            assert!(RequireAuth::parse(bad).is_err(), "{bad}");
        }
        let e = RequireAuth::parse("scram-sha-256,!md5").unwrap_err();
        assert!(e.contains("cannot be mixed"), "{e}");
        assert!(!RequireAuth::parse("").unwrap().is_set());
    }

    #[test]
    fn positive_list_demands_a_completed_listed_method() {
        let p = policy("scram-sha-256", ChannelBindingMode::Prefer);
        assert!(p.check(Request::Sasl, NOTHING).is_ok());
        let e = p.check(Request::Ok, NOTHING).unwrap_err();
        assert_eq!(
            e,
            "authentication method requirement \"scram-sha-256\" failed: server did not complete authentication"
        );
        assert!(p.check(Request::Ok, DONE).is_ok());
        assert!(p.check(Request::Password, NOTHING).unwrap_err().contains("cleartext"));
        assert!(p.check(Request::Md5, NOTHING).is_err());
        // "none" admits trust, still not other methods.
        let p = policy("scram-sha-256,none", ChannelBindingMode::Prefer);
        assert!(p.check(Request::Ok, NOTHING).is_ok());
        assert!(p.check(Request::Md5, NOTHING).is_err());
        let p = policy("none", ChannelBindingMode::Prefer);
        assert!(p.check(Request::Ok, NOTHING).is_ok());
        assert!(p.check(Request::Sasl, NOTHING).is_err());
    }

    #[test]
    fn negative_list_forbids_only_what_it_names() {
        let p = policy("!password,!md5", ChannelBindingMode::Prefer);
        assert!(p.check(Request::Ok, NOTHING).is_ok(), "trust is not excluded");
        assert!(p.check(Request::Sasl, NOTHING).is_ok());
        assert!(p.check(Request::Password, NOTHING).is_err());
        assert!(p.check(Request::Md5, NOTHING).is_err());
        let p = policy("!none", ChannelBindingMode::Prefer);
        assert!(p.check(Request::Ok, NOTHING).is_err());
        assert!(p.check(Request::Ok, DONE).is_ok());
        assert!(p.check(Request::Password, NOTHING).is_ok());
    }

    #[test]
    fn channel_binding_require_needs_a_bound_exchange() {
        let p = policy("", ChannelBindingMode::Require);
        assert!(p.check(Request::Sasl, NOTHING).is_ok());
        assert!(p.check(Request::Password, NOTHING).is_err());
        assert!(p.check(Request::Md5, NOTHING).is_err());
        assert!(p
            .check(Request::Ok, DONE)
            .unwrap_err()
            .contains("without channel binding"));
        let bound = Progress {
            finished: true,
            bound: true,
        };
        assert!(p.check(Request::Ok, bound).is_ok());
        // Unset require_auth: trust is fine without channel binding required.
        assert!(policy("", ChannelBindingMode::Prefer)
            .check(Request::Ok, NOTHING)
            .is_ok());
    }
}
