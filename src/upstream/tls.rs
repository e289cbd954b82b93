//! TLS to the upstream: the rustls client configuration for each sslmode (with libpq's meaning),
//! the certificate verifiers that implement them, rustls errors put into words an operator can
//! act on, and the tls-server-end-point channel-binding hash of the server certificate.

use std::io;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::Digest;
use x509_cert::der::asn1::{AnyRef, ObjectIdentifier};
use x509_cert::der::oid::db::rfc5912 as oids;
use x509_cert::der::{self, Decode, Reader, TagMode, TagNumber};
use x509_cert::spki::AlgorithmIdentifierRef;

use crate::config::{DatabaseConfig, SslMode};
use crate::pg::tls::ALPN_POSTGRESQL;
use crate::tls_files::{load_certs, load_key, load_roots, system_roots, NoSystemRoots, PemError};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a database entry's TLS settings cannot be used; the texts name the config keys.
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    /// ca_file, cert_file or key_file.
    #[error(transparent)]
    File(#[from] PemError),
    #[error(
        "databases[{index}].sslmode: sslmode {sslmode:?} without ca_file needs the system CA store, but {source}; set databases[{index}].ca_file"
    )]
    NoSystemRoots {
        index: usize,
        sslmode: &'static str,
        source: NoSystemRoots,
    },
    #[error("databases[{index}].key_file: {source}")]
    ClientAuth { index: usize, source: BuildError },
    #[error("databases[{index}].sslmode: {source}")]
    Other { index: usize, source: BuildError },
}

/// Builds the client configuration for a database entry, reading its ca_file, cert_file and
/// key_file. `None` for sslmode=disable. Errors name the config key and the file.
pub(crate) fn client_config(index: usize, db: &DatabaseConfig) -> Result<Option<Arc<ClientConfig>>, ClientConfigError> {
    if db.sslmode == SslMode::Disable {
        return Ok(None);
    }
    let key = |k: &str| format!("databases[{index}].{k}");
    let roots = match &db.ca_file {
        Some(path) => Some(load_roots(&key("ca_file"), path)?),
        None => None,
    };
    let client_auth = match &db.client_cert {
        Some(c) => Some((
            load_certs(&key("cert_file"), &c.cert_file)?,
            load_key(&key("key_file"), &c.key_file)?,
        )),
        None => None,
    };
    let config = build(db.sslmode, roots, client_auth).map_err(|e| match e {
        BuildError::NoSystemRoots(source) => ClientConfigError::NoSystemRoots {
            index,
            sslmode: db.sslmode.as_str(),
            source,
        },
        e @ BuildError::ClientAuth(_) => ClientConfigError::ClientAuth { index, source: e },
        e => ClientConfigError::Other { index, source: e },
    })?;
    Ok(Some(Arc::new(config)))
}

/// Why [`build`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    NoSystemRoots(NoSystemRoots),
    #[error("cannot use the client certificate and key: {0}")]
    ClientAuth(rustls::Error),
    #[error("cannot build certificate verifier: {0}")]
    Verifier(rustls::client::VerifierBuilderError),
    #[error("{0}")]
    Protocol(rustls::Error),
}

/// Builds a client configuration from already-loaded material.
///
/// `roots` is the ca_file contents. Following libpq, a CA file makes sslmode=require (and
/// prefer, when TLS is used) verify the chain as verify-ca does; without one, verify-ca and
/// verify-full use the system store and require/prefer verify nothing.
pub(crate) fn build(
    sslmode: SslMode,
    roots: Option<RootCertStore>,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, BuildError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match (sslmode, roots) {
        (SslMode::Disable | SslMode::Prefer | SslMode::Require, None) => Arc::new(NoVerify {
            algorithms: provider.signature_verification_algorithms,
        }),
        (mode, roots) => {
            let roots = match roots {
                Some(r) => r,
                None => system_roots().map_err(BuildError::NoSystemRoots)?,
            };
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(BuildError::Verifier)?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly { inner: webpki })
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(BuildError::Protocol)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_auth {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(BuildError::ClientAuth)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(config)
}

/// prefer/require without a CA file: encryption without authentication, as in libpq. The
/// handshake signatures are still checked, so the peer at least holds the certificate's key.
#[derive(Debug)]
struct NoVerify {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// verify-ca: the chain must lead to a trusted root, the host name is not checked.
/// WebPkiServerVerifier checks the chain before the name, so a name error means the chain passed.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// Puts a failed TLS handshake into words: `certificate for db.internal not valid: unknown issuer ...`.
pub(crate) fn describe_error(error: &io::Error, server_name: &ServerName<'_>) -> String {
    let name = server_name.to_str();
    if let Some(e) = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        return describe_rustls(e, &name);
    }
    match error.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection during the TLS handshake".into(),
        _ => error.to_string(),
    }
}

fn describe_rustls(error: &rustls::Error, name: &str) -> String {
    use rustls::AlertDescription as A;
    match error {
        rustls::Error::InvalidCertificate(e) => {
            format!("certificate for {name} not valid: {}", describe_certificate(e, name))
        }
        rustls::Error::AlertReceived(
            alert @ (A::CertificateRequired | A::HandshakeFailure | A::BadCertificate | A::UnknownCA),
        ) => {
            format!(
                "the server refused the handshake (TLS alert {alert:?}); if it requires a client certificate, set cert_file and key_file"
            )
        }
        rustls::Error::AlertReceived(alert) => format!("the server sent TLS alert {alert:?}"),
        rustls::Error::NoCertificatesPresented => "the server presented no certificate".into(),
        rustls::Error::PeerIncompatible(p) => {
            format!("no TLS version or cipher suite in common with the server ({p:?})")
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("the server's TLS handshake is malformed ({error})")
        }
        other => other.to_string(),
    }
}

fn describe_certificate(error: &CertificateError, name: &str) -> String {
    let when =
        |t: &UnixTime| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t.as_secs())).to_string();
    match error {
        CertificateError::UnknownIssuer => {
            "unknown issuer (it is not signed by a CA in ca_file, or in the system store when ca_file is not set)"
                .into()
        }
        CertificateError::NotValidForName => format!("not valid for {name}"),
        CertificateError::NotValidForNameContext { presented, .. } if presented.is_empty() => {
            format!("not valid for {name}: it names no host (set sni to the name it was issued for)")
        }
        CertificateError::NotValidForNameContext { presented, .. } => {
            format!(
                "not valid for {name}: it is for {} (set sni to the name it was issued for)",
                presented.join(", ")
            )
        }
        CertificateError::Expired => "expired".into(),
        CertificateError::ExpiredContext { not_after, .. } => format!("expired at {}", when(not_after)),
        CertificateError::NotValidYet => "not valid yet".into(),
        CertificateError::NotValidYetContext { not_before, .. } => format!("not valid before {}", when(not_before)),
        CertificateError::Revoked => "revoked".into(),
        CertificateError::BadSignature => {
            "bad signature (its issuer has the name of a trusted CA but did not sign it)".into()
        }
        CertificateError::BadEncoding => "malformed certificate".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "not issued for TLS server authentication (extended key usage)".into()
        }
        CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "signed with an unsupported algorithm".into()
        }
        other => other.to_string(),
    }
}

// --- tls-server-end-point (RFC 5929) ---

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// ecdsa-with-SHA1 (RFC 5758), which const-oid's database lacks.
const ECDSA_WITH_SHA_1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.1");

/// Signature algorithms and the hash tls-server-end-point uses for each: MD5 and SHA-1 become
/// SHA-256 (RFC 5929 4.1). RSASSA-PSS names its hash in its parameters ([`pss_hash`]).
const SIGNATURE_HASHES: &[(ObjectIdentifier, Hash)] = &[
    (oids::MD_5_WITH_RSA_ENCRYPTION, Hash::Sha256),
    (oids::SHA_1_WITH_RSA_ENCRYPTION, Hash::Sha256),
    (oids::SHA_224_WITH_RSA_ENCRYPTION, Hash::Sha224),
    (oids::SHA_256_WITH_RSA_ENCRYPTION, Hash::Sha256),
    (oids::SHA_384_WITH_RSA_ENCRYPTION, Hash::Sha384),
    (oids::SHA_512_WITH_RSA_ENCRYPTION, Hash::Sha512),
    (ECDSA_WITH_SHA_1, Hash::Sha256),
    (oids::ECDSA_WITH_SHA_224, Hash::Sha224),
    (oids::ECDSA_WITH_SHA_256, Hash::Sha256),
    (oids::ECDSA_WITH_SHA_384, Hash::Sha384),
    (oids::ECDSA_WITH_SHA_512, Hash::Sha512),
    (oids::DSA_WITH_SHA_1, Hash::Sha256),
    (oids::DSA_WITH_SHA_224, Hash::Sha224),
    (oids::DSA_WITH_SHA_256, Hash::Sha256),
];

/// Hash algorithms as RSASSA-PSS parameters name them; SHA-1 becomes SHA-256.
const PSS_HASHES: &[(ObjectIdentifier, Hash)] = &[
    (oids::ID_SHA_1, Hash::Sha256),
    (oids::ID_SHA_224, Hash::Sha224),
    (oids::ID_SHA_256, Hash::Sha256),
    (oids::ID_SHA_384, Hash::Sha384),
    (oids::ID_SHA_512, Hash::Sha512),
];

fn lookup(table: &[(ObjectIdentifier, Hash)], oid: &ObjectIdentifier) -> Option<Hash> {
    table.iter().find(|(o, _)| o == oid).map(|(_, h)| *h)
}

/// The tls-server-end-point channel-binding data for a server certificate: its DER hashed with
/// the hash of its signature algorithm, SHA-256 when that is MD5 or SHA-1 (RFC 5929 4.1, which
/// Postgres follows). `None` for algorithms without a hash of their own (Ed25519, Ed448) or an
/// unparsable certificate; Postgres cannot bind to those either.
pub(crate) fn certificate_hash(der: &[u8]) -> Option<Vec<u8>> {
    let hash = signature_hash(der)?;
    Some(match hash {
        Hash::Sha224 => sha2::Sha224::digest(der).to_vec(),
        Hash::Sha256 => sha2::Sha256::digest(der).to_vec(),
        Hash::Sha384 => sha2::Sha384::digest(der).to_vec(),
        Hash::Sha512 => sha2::Sha512::digest(der).to_vec(),
    })
}

/// The hash of the certificate's `signatureAlgorithm`.
fn signature_hash(der: &[u8]) -> Option<Hash> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let alg = cert.signature_algorithm();
    if alg.oid == oids::ID_RSASSA_PSS {
        return pss_hash(alg.parameters.as_ref()?.into());
    }
    lookup(SIGNATURE_HASHES, &alg.oid)
}

/// RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier DEFAULT sha1, ... }
fn pss_hash(params: AnyRef<'_>) -> Option<Hash> {
    let hash = params
        .sequence(|r| {
            let hash: Option<AlgorithmIdentifierRef<'_>> = r.context_specific(TagNumber(0), TagMode::Explicit)?;
            // maskGenAlgorithm, saltLength, trailerField: not needed here.
            r.drain(r.remaining_len())?;
            Ok::<_, der::Error>(hash)
        })
        .ok()?;
    match hash {
        None => Some(Hash::Sha256), // the default, SHA-1
        Some(alg) => lookup(PSS_HASHES, &alg.oid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["db.internal".to_string()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn channel_binding_hash_follows_the_signature_algorithm() {
        let p256 = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(signature_hash(&p256), Some(Hash::Sha256));
        assert_eq!(certificate_hash(&p256).unwrap(), sha2::Sha256::digest(&p256).to_vec());
        let p384 = cert_with(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(signature_hash(&p384), Some(Hash::Sha384));
        assert_eq!(certificate_hash(&p384).unwrap().len(), 48);
        let ed = cert_with(&rcgen::PKCS_ED25519);
        assert_eq!(certificate_hash(&ed), None);
        assert_eq!(certificate_hash(b"\x30\x03\x02\x01"), None);
        assert_eq!(certificate_hash(b""), None);
    }

    #[test]
    fn pss_parameters_name_the_hash() {
        // AlgorithmIdentifier parameters for RSASSA-PSS with SHA-384, and with the default.
        let sha384 = [
            0x30, 0x0f, 0xa0, 0x0d, 0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02,
        ];
        fn any(der: &[u8]) -> AnyRef<'_> {
            AnyRef::from_der(der).unwrap()
        }
        assert_eq!(pss_hash(any(&sha384)), Some(Hash::Sha384));
        assert_eq!(pss_hash(any(&[0x30, 0x00])), Some(Hash::Sha256));
        // SHA3-256 (2.16.840.1.101.3.4.2.8) has no SHA-2 digest here; an INTEGER is no sequence.
        let sha3 = [
            0x30, 0x0f, 0xa0, 0x0d, 0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x08,
        ];
        assert_eq!(pss_hash(any(&sha3)), None);
        assert_eq!(pss_hash(any(&[0x02, 0x01, 0x00])), None);
    }

    #[test]
    fn truncated_and_trailing_bytes_are_no_certificate() {
        let p256 = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(certificate_hash(&p256[..p256.len() - 1]), None);
        let mut trailing = p256.clone();
        trailing.push(0);
        assert_eq!(certificate_hash(&trailing), None);
    }
}
