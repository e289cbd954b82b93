//! The configured Vault addresses (`vault.address`, one URL or the nodes of an HA cluster) and
//! what dbward knows about each node's health. A request goes to the node that answered last;
//! a node that could not answer (no connection, timeout, 503, 5xx) is set aside for
//! [`RETRY_FAILED_AFTER`] and tried again only when every other node failed too, so a dead node
//! costs one attempt, not one per request. A 307 from a standby is followed only to a configured
//! address: a redirect is never a way to send the token somewhere the config did not name.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a node that failed is passed over while another node answers.
pub(crate) const RETRY_FAILED_AFTER: Duration = Duration::from_secs(10);

pub(crate) struct Nodes {
    nodes: Vec<Node>,
    /// The node that answered last: requests start there.
    preferred: AtomicUsize,
}

struct Node {
    /// `http(s)://host:port`, no trailing slash.
    base: String,
    /// Passed over until then (unless every node is).
    down_until: Mutex<Option<Instant>>,
}

impl Nodes {
    /// `addresses` as validated by the config: at least one, no trailing slash.
    pub(crate) fn new(addresses: &[String]) -> Self {
        Nodes {
            nodes: addresses
                .iter()
                .map(|a| Node {
                    base: a.trim_end_matches('/').to_string(),
                    down_until: Mutex::new(None),
                })
                .collect(),
            preferred: AtomicUsize::new(0),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn base(&self, i: usize) -> &str {
        &self.nodes[i].base
    }

    /// The order in which a request tries the nodes: the preferred one, then the others in
    /// config order, each only if it is not set aside; then the set-aside ones, soonest due first.
    pub(crate) fn order(&self, now: Instant) -> Vec<usize> {
        let n = self.nodes.len();
        let first = self.preferred.load(Ordering::Relaxed).min(n - 1);
        let mut up = Vec::with_capacity(n);
        let mut down = Vec::new();
        for i in std::iter::once(first).chain((0..n).filter(|&i| i != first)) {
            match *self.nodes[i].down_until.lock().unwrap() {
                Some(until) if until > now => down.push((until, i)),
                _ => up.push(i),
            }
        }
        down.sort();
        up.extend(down.into_iter().map(|(_, i)| i));
        up
    }

    /// Node `i` could not answer: it is passed over for a while.
    pub(crate) fn failed(&self, i: usize, now: Instant) {
        *self.nodes[i].down_until.lock().unwrap() = Some(now + RETRY_FAILED_AFTER);
    }

    /// Node `i` answered: later requests start there.
    pub(crate) fn answered(&self, i: usize) {
        *self.nodes[i].down_until.lock().unwrap() = None;
        self.preferred.store(i, Ordering::Relaxed);
    }

    /// The configured node a redirect's `Location` points at, if any (scheme, host and port
    /// must match exactly; the path must be under `/v1/`).
    pub(crate) fn redirect_target(&self, location: &str) -> Option<usize> {
        self.nodes.iter().position(|n| {
            location
                .strip_prefix(n.base.as_str())
                .is_some_and(|rest| rest.starts_with("/v1/"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Nodes {
        Nodes::new(&[
            "http://127.0.0.1:1".to_string(),
            "http://127.0.0.1:2/".to_string(),
            "http://127.0.0.1:3".to_string(),
        ])
    }

    #[test]
    fn a_failed_node_is_passed_over_until_its_time_is_up_then_tried_again() {
        let n = three();
        let t0 = Instant::now();
        assert_eq!(n.order(t0), vec![0, 1, 2]);
        n.failed(0, t0);
        assert_eq!(n.order(t0), vec![1, 2, 0], "the failed node is the last resort");
        n.answered(1);
        assert_eq!(n.order(t0 + Duration::from_secs(1)), vec![1, 2, 0]);
        assert_eq!(n.order(t0 + RETRY_FAILED_AFTER), vec![1, 0, 2], "tried again later");
    }

    #[test]
    fn when_every_node_failed_the_soonest_due_comes_first() {
        let n = three();
        let t0 = Instant::now();
        n.failed(2, t0);
        n.failed(0, t0 + Duration::from_secs(1));
        n.failed(1, t0 + Duration::from_secs(2));
        assert_eq!(n.order(t0 + Duration::from_secs(3)), vec![2, 0, 1]);
    }

    #[test]
    fn redirects_are_followed_to_configured_addresses_only() {
        let n = three();
        assert_eq!(n.redirect_target("http://127.0.0.1:2/v1/database/creds/x"), Some(1));
        assert_eq!(n.redirect_target("http://127.0.0.1:22/v1/database/creds/x"), None);
        assert_eq!(n.redirect_target("https://127.0.0.1:2/v1/x"), None);
        assert_eq!(n.redirect_target("http://evil.example/v1/x"), None);
        assert_eq!(n.redirect_target("http://127.0.0.1:2@evil/v1/x"), None);
    }
}
