//! Cancel keys. dbward hands each client a BackendKeyData of its own and remembers which
//! upstream backend it stands for, so a CancelRequest is routed to the right server and a client
//! can never cancel a backend it was not given.
//!
//! The process id is the backend's real one: clients compare it with the pid in NOTIFY messages
//! (to skip their own notifications) and with `pg_backend_pid()`. The secret is fresh from the
//! operating system's CSPRNG for every session and unrelated to the upstream's, so one key says
//! nothing about another; 3.2 clients get 32 bytes of it, 3.0 clients the 4 they can carry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use rand::RngCore;

/// A backend's cancel key: process id and secret (4 bytes in protocol 3.0, up to 256 in 3.2).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret lets anyone cancel the backend's queries.
        f.debug_struct("BackendKey")
            .field("pid", &self.pid)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

impl BackendKey {
    /// BackendKeyData ('K').
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u8(b'K');
        buf.put_i32((8 + self.secret.len()) as i32);
        buf.put_i32(self.pid);
        buf.put_slice(&self.secret);
    }

    /// A CancelRequest packet for this key.
    pub fn cancel_request(&self) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_i32((12 + self.secret.len()) as i32);
        b.put_u32(super::startup::CANCEL_REQUEST_CODE);
        b.put_i32(self.pid);
        b.put_slice(&self.secret);
        b
    }
}

/// Where a client-facing key leads: the database entry and the upstream backend's own key.
#[derive(Debug, Clone)]
pub(crate) struct CancelTarget<T> {
    pub(crate) database: String,
    pub(crate) upstream: T,
    pub(crate) key: BackendKey,
}

/// Client-facing key → upstream backend. `T` carries how to reach the upstream (its settings).
pub(crate) struct CancelMap<T> {
    inner: Mutex<HashMap<BackendKey, CancelTarget<T>>>,
}

impl<T: Clone> Default for CancelMap<T> {
    fn default() -> Self {
        CancelMap {
            inner: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: Clone> CancelMap<T> {
    /// Registers an upstream backend and returns the key to give the client: the backend's pid
    /// with a random secret of `secret_len` bytes. The mapping lives as long as the guard.
    pub(crate) fn register(
        self: &Arc<Self>,
        target: CancelTarget<T>,
        secret_len: usize,
    ) -> (BackendKey, CancelGuard<T>) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = loop {
            let mut secret = vec![0u8; secret_len];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            // Two servers can have backends with the same pid; the secret keeps keys apart.
            let key = BackendKey {
                pid: target.key.pid,
                secret,
            };
            if !map.contains_key(&key) && key != target.key {
                break key;
            }
        };
        map.insert(key.clone(), target);
        (
            key.clone(),
            CancelGuard {
                map: Arc::clone(self),
                key,
            },
        )
    }

    pub(crate) fn lookup(&self, key: &BackendKey) -> Option<CancelTarget<T>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Removes the mapping when the session ends.
pub(crate) struct CancelGuard<T: Clone> {
    map: Arc<CancelMap<T>>,
    key: BackendKey,
}

impl<T: Clone> Drop for CancelGuard<T> {
    fn drop(&mut self) {
        self.map
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_mapping_ends_with_the_session() {
        let map: Arc<CancelMap<u16>> = Arc::default();
        let upstream_key = BackendKey {
            pid: 4242,
            secret: vec![9, 9, 9, 9],
        };
        let target = CancelTarget {
            database: "payments".into(),
            upstream: 5432u16,
            key: upstream_key.clone(),
        };
        let (k1, g1) = map.register(target.clone(), 4);
        let (k2, g2) = map.register(target, 32);
        assert_ne!(k1, k2);
        assert_eq!((k1.pid, k1.secret.len(), k2.secret.len()), (4242, 4, 32));
        assert_ne!(k1, upstream_key, "the upstream key must not be handed to clients");
        assert_eq!(map.lookup(&k1).unwrap().key, upstream_key);
        drop(g1);
        assert!(map.lookup(&k1).is_none());
        assert!(map.lookup(&k2).is_some());
        drop(g2);
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn secrets_are_unpredictable() {
        let map: Arc<CancelMap<u16>> = Arc::default();
        let target = CancelTarget {
            database: "d".into(),
            upstream: 1u16,
            key: BackendKey {
                pid: 1,
                secret: vec![0; 4],
            },
        };
        let guards: Vec<_> = (0..2000).map(|_| map.register(target.clone(), 4)).collect();
        let secrets: std::collections::HashSet<_> = guards.iter().map(|(k, _)| k.secret.clone()).collect();
        assert_eq!(secrets.len(), guards.len());
        // Consecutive keys share no structure: no byte position is constant across them.
        for i in 0..4 {
            let values: std::collections::HashSet<u8> = guards.iter().map(|(k, _)| k.secret[i]).collect();
            assert!(values.len() > 200, "byte {i} takes only {} values", values.len());
        }
        assert_eq!(map.len(), 2000);
        drop(guards);
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn cancel_request_layout() {
        let k = BackendKey {
            pid: 7,
            secret: vec![1, 2, 3, 4],
        };
        let b = k.cancel_request();
        assert_eq!(&b[..], &[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 7, 1, 2, 3, 4]);
        assert!(!format!("{k:?}").contains("[1, 2, 3, 4]"));
    }
}
