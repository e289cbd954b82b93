//! The PEM files and trust anchors of every TLS endpoint (upstreams, clients, Vault): one
//! loader for certificates, private keys and CA files, and one rule for the system CA store,
//! so that the upstreams and the Vault client cannot disagree about an empty store. Errors are
//! [`PemError`] (naming the config key and the file) and [`NoSystemRoots`].

use std::io;
use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file named by a config key that cannot be used. The texts name the key and the file:
/// `databases[0].ca_file: cannot read "/x.pem": No such file or directory (os error 2)`.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{key}: cannot read {path:?}: {source}")]
    Read {
        key: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{key}: cannot parse {path:?}: {source}")]
    Parse {
        key: String,
        path: String,
        #[source]
        source: pem::Error,
    },
    /// `what`: "certificate" or "private key".
    #[error("{key}: {path:?} contains no PEM {what}")]
    Empty {
        key: String,
        path: String,
        what: &'static str,
    },
    #[error("{key}: {path:?} holds a certificate that cannot be a trust anchor: {source}")]
    NotATrustAnchor {
        key: String,
        path: String,
        #[source]
        source: rustls::Error,
    },
}

/// The system CA store holds no usable certificate. The text says why ("it is empty", "none
/// could be loaded (...)"); callers say what needed it and which key to set instead.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct NoSystemRoots {
    why: String,
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        key: key.into(),
        path: path.display().to_string(),
        source,
    })
}

fn parse_error(key: &str, path: &Path) -> impl FnOnce(pem::Error) -> PemError {
    let (key, path) = (key.to_string(), path.display().to_string());
    move |source| PemError::Parse { key, path, source }
}

/// The certificates in the PEM file `path` (config key `key`): at least one.
pub(crate) fn load_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(parse_error(key, path))?;
    if certs.is_empty() {
        return Err(PemError::Empty {
            key: key.into(),
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The first private key in the PEM file `path` (config key `key`).
pub(crate) fn load_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = read(key, path)?;
    // PKCS#8, PKCS#1 (RSA) or SEC1 (EC), whichever comes first.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => PemError::Empty {
            key: key.into(),
            path: path.display().to_string(),
            what: "private key",
        },
        e => parse_error(key, path)(e),
    })
}

/// The trust anchors in the CA file `path` (config key `key`): at least one, every one usable.
pub(crate) fn load_roots(key: &str, path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(key, path)? {
        roots.add(cert).map_err(|source| PemError::NotATrustAnchor {
            key: key.into(),
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(roots)
}

/// The system CA store, for a client that verifies servers without a CA file of its own.
/// The one rule for every client: unreadable or unusable system certificates are skipped (one
/// bad file must not stop start-up), but a store left empty is an error now, not an `unknown
/// issuer` at every connection later. Clients that verify nothing (plain http, sslmode=require
/// without ca_file) do not ask.
pub(crate) fn system_roots() -> Result<RootCertStore, NoSystemRoots> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if roots.is_empty() {
        let why = match loaded.errors.first() {
            Some(e) => format!("none could be loaded ({e})"),
            None => "it is empty".to_string(),
        };
        return Err(NoSystemRoots { why });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = load_roots("vault.ca_file", &missing).unwrap_err();
        assert!(matches!(e, PemError::Read { .. }));
        assert!(
            e.to_string().starts_with(&format!(
                "vault.ca_file: cannot read {:?}: ",
                missing.display().to_string()
            )),
            "{e}"
        );

        let empty = write(dir.path(), "empty.pem", "no PEM here\n");
        let e = load_roots("databases[0].ca_file", &empty).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "databases[0].ca_file: {:?} contains no PEM certificate",
                empty.display().to_string()
            )
        );
        let e = load_key("databases[0].key_file", &empty).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "databases[0].key_file: {:?} contains no PEM private key",
                empty.display().to_string()
            )
        );

        let bad = write(
            dir.path(),
            "bad.pem",
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        );
        let e = load_certs("databases[0].cert_file", &bad).unwrap_err();
        assert!(matches!(e, PemError::Parse { .. }), "{e}");
        assert!(e.to_string().starts_with("databases[0].cert_file: cannot parse"), "{e}");
    }

    #[test]
    fn a_ca_file_loads_its_certificates_and_a_key_file_its_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["ca.internal".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = write(dir.path(), "ca.pem", &ca.pem());
        assert_eq!(load_roots("vault.ca_file", &ca_file).unwrap().len(), 1);
        let key_file = write(dir.path(), "key.pem", &key.serialize_pem());
        assert!(load_key("databases[0].key_file", &key_file).is_ok());
    }
}
