//! TLS towards clients (`client_tls = { cert_file, key_file }`): the rustls server
//! configuration, loaded on first use and again whenever either file changes (certificates are
//! rotated in place by cert-manager and the like, and a restart would drop every session), and
//! [`Rewind`], which puts bytes already read back in front of a stream so that a direct-TLS
//! ClientHello that arrived before we knew it was one still reaches the handshake.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, BytesMut};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::{ClientTlsConfig, DatabaseConfig};
use crate::tls_files::{load_certs, load_key, PemError};

/// The ALPN protocol name Postgres 17 registered. Clients that offer ALPN must offer this one;
/// direct TLS (no SSLRequest first) requires it, so that a TLS connection meant for another
/// service cannot be replayed at a Postgres port. dbward offers it to upstreams too (older
/// servers ignore it, newer ones check it): this is its one definition.
pub(crate) const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The first byte of a TLS handshake record: a client doing direct TLS sends a ClientHello where
/// others send a packet length (which, starting with 0x16, would be over 300 MB).
pub(crate) const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// Why an entry's `client_tls` files cannot be served; the texts name the config key and file.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error(transparent)]
    File(#[from] PemError),
    #[error("{key}: {source}")]
    Protocols { key: String, source: Box<rustls::Error> },
    #[error("{key}: cannot use {key_file:?} with the certificate in {cert_file:?}: {source}")]
    KeyMismatch {
        key: String,
        key_file: String,
        cert_file: String,
        source: Box<rustls::Error>,
    },
}

/// Builds the server configuration from the entry's files. Errors name the config key and file.
pub(crate) fn server_config(index: usize, cfg: &ClientTlsConfig) -> Result<Arc<ServerConfig>, ServerTlsError> {
    let key = |k: &str| format!("databases[{index}].client_tls.{k}");
    let certs = load_certs(&key("cert_file"), &cfg.cert_file)?;
    let private_key = load_key(&key("key_file"), &cfg.key_file)?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|source| ServerTlsError::Protocols {
            key: key("cert_file"),
            source: Box::new(source),
        })?
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .map_err(|source| ServerTlsError::KeyMismatch {
            key: key("key_file"),
            key_file: cfg.key_file.display().to_string(),
            cert_file: cfg.cert_file.display().to_string(),
            source: Box::new(source),
        })?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

/// Modification times of the certificate and key files: a change of either means a reload.
type Stamp = (Option<SystemTime>, Option<SystemTime>);

fn stamp(cfg: &ClientTlsConfig) -> Stamp {
    let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (mtime(&cfg.cert_file), mtime(&cfg.key_file))
}

struct Loaded {
    stamp: Stamp,
    config: Arc<ServerConfig>,
}

/// One database entry's client TLS: the loaded configuration, re-read when the files change.
pub(crate) struct ClientTls {
    index: usize,
    database: String,
    cfg: ClientTlsConfig,
    loaded: Mutex<Loaded>,
}

impl ClientTls {
    /// Reads the entry's files now; `None` for entries without `client_tls`. Errors name the
    /// config key and the file.
    pub(crate) fn load(index: usize, db: &DatabaseConfig) -> Result<Option<Arc<ClientTls>>, ServerTlsError> {
        let Some(cfg) = &db.client_tls else {
            return Ok(None);
        };
        let stamp = stamp(cfg);
        let config = server_config(index, cfg)?;
        Ok(Some(Arc::new(ClientTls {
            index,
            database: db.name.clone(),
            cfg: cfg.clone(),
            loaded: Mutex::new(Loaded { stamp, config }),
        })))
    }

    /// The acceptor to use now. When the files changed since they were read, they are read
    /// again; should that fail (a half-written file during rotation), the previous
    /// configuration stays in use and the failure is logged once per change.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let now = stamp(&self.cfg);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.stamp != now {
            loaded.stamp = now;
            match server_config(self.index, &self.cfg) {
                Ok(config) => {
                    tracing::info!(database = %self.database, cert_file = %self.cfg.cert_file.display(), "client TLS certificate reloaded");
                    loaded.config = config;
                }
                Err(e) => {
                    tracing::warn!(database = %self.database, error = %e, "client TLS files changed but cannot be loaded; keeping the previous certificate");
                }
            }
        }
        loaded.config.clone().into()
    }
}

/// A stream with some already-read bytes put back in front of it.
pub(crate) struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: BytesMut, inner: S) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn write_pair(dir: &std::path::Path, name: &str) -> ClientTlsConfig {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let cert_file = dir.join("cert.pem");
        let key_file = dir.join("key.pem");
        std::fs::write(&cert_file, cert.cert.pem()).unwrap();
        std::fs::write(&key_file, cert.key_pair.serialize_pem()).unwrap();
        ClientTlsConfig { cert_file, key_file }
    }

    fn db(name: &str, tls: ClientTlsConfig) -> DatabaseConfig {
        let mut db = crate::config::test_config("", "kind = \"kv\"\npath = \"secret/data/x\"")
            .databases
            .remove(0);
        db.name = name.to_string();
        db.client_tls = Some(tls);
        db
    }

    #[test]
    fn errors_name_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ClientTlsConfig {
            cert_file: dir.path().join("nope.pem"),
            key_file: dir.path().join("k.pem"),
        };
        let e = server_config(3, &missing).unwrap_err().to_string();
        assert!(e.starts_with("databases[3].client_tls.cert_file: cannot read"), "{e}");
        assert!(e.contains("nope.pem"), "{e}");

        let good = write_pair(dir.path(), "a.test");
        let other = tempfile::tempdir().unwrap();
        let other = write_pair(other.path(), "b.test");
        let mismatched = ClientTlsConfig {
            cert_file: good.cert_file,
            key_file: other.key_file,
        };
        let e = server_config(0, &mismatched).unwrap_err().to_string();
        assert!(e.starts_with("databases[0].client_tls.key_file:"), "{e}");
    }

    #[test]
    fn reloads_when_the_files_change_and_keeps_the_old_one_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let tls = write_pair(dir.path(), "one.test");
        let entry = db("tls_reload_unit", tls.clone());
        let client_tls = ClientTls::load(0, &entry).unwrap().unwrap();
        let first = client_tls.acceptor();
        let again = client_tls.acceptor();
        assert!(
            Arc::ptr_eq(first.config(), again.config()),
            "unchanged files are not re-read"
        );
        assert_eq!(first.config().alpn_protocols, vec![ALPN_POSTGRESQL.to_vec()]);

        // mtime granularity can be coarse: make sure the new files look newer.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_pair(dir.path(), "two.test");
        let later = SystemTime::now() + std::time::Duration::from_secs(2);
        for f in [&tls.cert_file, &tls.key_file] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(later)
                .unwrap();
        }
        let reloaded = client_tls.acceptor();
        assert!(
            !Arc::ptr_eq(first.config(), reloaded.config()),
            "changed files are re-read"
        );

        std::fs::write(&tls.key_file, "garbage").unwrap();
        let even_later = later + std::time::Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&tls.key_file)
            .unwrap()
            .set_modified(even_later)
            .unwrap();
        let kept = client_tls.acceptor();
        assert!(
            Arc::ptr_eq(reloaded.config(), kept.config()),
            "a bad file keeps the previous config"
        );
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_first() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = Rewind::new(BytesMut::from(&b"hello "[..]), b);
        a.write_all(b"world").await.unwrap();
        drop(a);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
