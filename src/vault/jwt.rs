//! The workload JWT as dbward reads it before a login: its claims (never its signature, which
//! is Vault's to verify), and the time checks that turn an expired or not-yet-valid token into
//! a local error naming the file instead of a bare 403 from Vault.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::error::LocalError;

/// The claims dbward looks at; Vault verifies the signature, dbward only reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct JwtClaims {
    pub(crate) sub: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub(crate) aud: Vec<String>,
    pub(crate) iss: Option<String>,
    pub(crate) exp: Option<u64>,
    pub(crate) nbf: Option<u64>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

impl JwtClaims {
    /// `sub=..., aud=...` for log lines and errors, so they can be matched against the role's bound claims.
    pub(crate) fn describe(&self) -> String {
        format!(
            "sub={}, aud={}, iss={}",
            self.sub.as_deref().unwrap_or("(none)"),
            if self.aud.is_empty() {
                "(none)".to_string()
            } else {
                self.aud.join(",")
            },
            self.iss.as_deref().unwrap_or("(none)")
        )
    }
}

/// Reads the JWT's claims without verifying it (Vault verifies). Errors name the file, never the token.
pub(crate) fn read_claims(jwt: &str, file: &Path) -> Result<JwtClaims, LocalError> {
    let mut validation = jsonwebtoken::Validation::default();
    validation.insecure_disable_signature_validation();
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let header = jsonwebtoken::decode_header(jwt).map_err(|source| LocalError::NotAJwt {
        file: file.to_path_buf(),
        source,
    })?;
    validation.algorithms = vec![header.alg];
    let data = jsonwebtoken::decode::<JwtClaims>(jwt, &jsonwebtoken::DecodingKey::from_secret(&[]), &validation)
        .map_err(|source| LocalError::UnreadableClaims {
            file: file.to_path_buf(),
            source,
        })?;
    Ok(data.claims)
}

/// Refuses to send a JWT Vault would refuse for its times, saying so in terms an operator can act
/// on. The error keeps the claims, for the diagnosis and for the message.
pub(crate) fn check_jwt_times(claims: &JwtClaims, file: &Path, now: SystemTime) -> Result<(), LocalError> {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if let Some(exp) = claims.exp.filter(|exp| *exp <= now) {
        return Err(LocalError::JwtExpired {
            file: file.to_path_buf(),
            exp,
            claims: Arc::new(claims.clone()),
        });
    }
    // A minute of leeway, as Vault allows for clock skew by default.
    if let Some(nbf) = claims.nbf.filter(|nbf| *nbf > now + 60) {
        return Err(LocalError::JwtNotYetValid {
            file: file.to_path_buf(),
            nbf,
            claims: Arc::new(claims.clone()),
        });
    }
    Ok(())
}
