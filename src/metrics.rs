//! Prometheus metrics. One [`Metrics`] owns its own registry and is passed down (no global
//! registry: tests run many instances in one process). Labels are database entry names,
//! operations and status codes: never users, lease ids or secrets.
//!
//! Most series are updated where things happen (sessions, the credential store, the Vault
//! client). The "how long is left" gauges and readiness are instead computed when `/metrics` is
//! scraped (see `admin::refresh_scrape_gauges`): a value set at fetch time would go stale as
//! the clock runs, and tokens are renewed in places that do not know about metrics.

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every label name dbward uses: entry names and fixed vocabularies, never users, lease ids
/// or secrets. Tests hold every family (and a live scrape) to this list.
pub const LABEL_NAMES: &[&str] = &[
    "database",
    // Only hosts from the configured upstream list: bounded by the config.
    "host",
    "reason",
    "sqlstate_class",
    "direction",
    "result",
    "operation",
    "status",
    "version",
    "address",
];

pub struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) client_connections_total: IntCounterVec,
    pub(crate) client_connections_active: IntGaugeVec,
    pub(crate) client_connections_rejected_total: IntCounterVec,
    pub(crate) client_startup_errors_total: IntCounterVec,
    pub(crate) upstream_connect_seconds: HistogramVec,
    pub(crate) upstream_connect_failures_total: IntCounterVec,
    pub(crate) bytes_total: IntCounterVec,
    pub(crate) credential_cache_total: IntCounterVec,
    pub(crate) credential_fetch_total: IntCounterVec,
    pub(crate) credential_expiry_timestamp_seconds: GaugeVec,
    /// Set at scrape time: seconds until the cached credential stops being valid; 0 when none
    /// is cached; absent for credentials without expiry (KV).
    pub(crate) credential_expires_in_seconds: GaugeVec,
    /// Fetches by the background lifecycle (ahead of expiry, or when none is cached), not by
    /// clients; incremented in `CredentialStore::refresh_step`.
    pub(crate) credential_refreshes_total: IntCounterVec,
    /// Set at scrape time: 1 when the entry holds a valid credential and dbward is not
    /// shutting down (what `/readyz` reports, without asking Vault).
    pub(crate) database_ready: IntGaugeVec,
    pub(crate) credential_rejected_total: IntCounterVec,
    pub(crate) vault_requests_total: IntCounterVec,
    pub(crate) vault_request_seconds: HistogramVec,
    /// A request moved on from a Vault node that could not answer; `address` is that node's.
    pub(crate) vault_failovers_total: IntCounterVec,
    /// New credentials the minting budget refused (a valid one was reused instead).
    pub(crate) credential_budget_exhausted_total: IntCounterVec,
    /// Leases dbward holds now, current and replaced ones, per entry.
    pub(crate) leases_held: IntGaugeVec,
    pub(crate) vault_denied_total: IntCounterVec,
    pub(crate) vault_token_expiry_timestamp_seconds: IntGauge,
    /// Set at scrape time; no labels. Absent before the first login and for tokens that never
    /// expire, so dashboards do not show a misleading 0 or infinity.
    pub(crate) vault_token_expires_in_seconds: GaugeVec,
    pub(crate) cancel_requests_total: IntCounterVec,
    pub(crate) lease_renewals_total: IntCounterVec,
    pub(crate) lease_revocations_total: IntCounterVec,
    pub(crate) sessions_retired_total: IntCounterVec,
    pub(crate) build_info: IntGaugeVec,
    pub(crate) pool_idle: IntGaugeVec,
    pub(crate) pool_reused_total: IntCounterVec,
    pub(crate) pool_closed_total: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Creates collectors and registers them in one registry; names are unique by construction.
struct Registrar(Registry);

impl Registrar {
    fn reg<C: prometheus::core::Collector + Clone + 'static>(&self, c: prometheus::Result<C>) -> C {
        let c = c.expect("valid metric");
        self.0.register(Box::new(c.clone())).expect("metric names are unique");
        c
    }
    fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.reg(IntCounterVec::new(Opts::new(name, help), labels))
    }
    fn int_gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.reg(IntGaugeVec::new(Opts::new(name, help), labels))
    }
    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.reg(GaugeVec::new(Opts::new(name, help), labels))
    }
    /// Exponential buckets from 1 ms, doubling `count` times.
    fn histogram(&self, name: &str, help: &str, count: usize, labels: &[&str]) -> HistogramVec {
        let buckets = exponential_buckets(0.001, 2.0, count).expect("valid buckets");
        self.reg(HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets),
            labels,
        ))
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let r = Registrar(Registry::new());
        let db = &["database"][..];
        let m = Metrics {
            client_connections_total: r.counter("dbward_client_connections_total", "Client connections accepted.", db),
            client_connections_active: r.int_gauge("dbward_client_connections_active", "Client connections open now.", db),
            client_connections_rejected_total: r.counter(
                "dbward_client_connections_rejected_total",
                "Client connections refused before relaying, by reason (credential, upstream, too_many_connections, peer_not_allowed).",
                &["database", "reason"],
            ),
            client_startup_errors_total: r.counter(
                "dbward_client_startup_errors_total",
                "Client connections ended before authentication because of what the client sent (or did not send in time), by reason; most end without a word, as Postgres ends them.",
                &["database", "reason"],
            ),
            upstream_connect_seconds: r.histogram(
                "dbward_upstream_connect_seconds",
                "Time to open and authenticate an upstream connection, by the configured host it landed on.",
                14,
                &["database", "host"],
            ),
            upstream_connect_failures_total: r.counter(
                "dbward_upstream_connect_failures_total",
                "Upstream connection attempts that failed, by configured host and SQLSTATE class.",
                &["database", "host", "sqlstate_class"],
            ),
            bytes_total: r.counter(
                "dbward_relayed_bytes_total",
                "Bytes relayed; direction is to_upstream or to_client.",
                &["database", "direction"],
            ),
            credential_cache_total: r.counter(
                "dbward_credential_cache_total",
                "Credential lookups by result: hit or miss.",
                &["database", "result"],
            ),
            credential_fetch_total: r.counter(
                "dbward_credential_fetch_total",
                "Credential reads from Vault by result: ok or error.",
                &["database", "result"],
            ),
            credential_expiry_timestamp_seconds: r.gauge(
                "dbward_credential_expiry_timestamp_seconds",
                "Unix time at which the current credential stops being valid (absent for KV secrets).",
                db,
            ),
            credential_expires_in_seconds: r.gauge(
                "dbward_credential_expires_in_seconds",
                "Seconds until the cached credential stops being valid (0: none cached; absent for KV secrets).",
                db,
            ),
            credential_refreshes_total: r.counter(
                "dbward_credential_refreshes_total",
                "Credential fetches by the background lifecycle (ahead of expiry, or when none is cached), by result: ok or error.",
                &["database", "result"],
            ),
            database_ready: r.int_gauge(
                "dbward_database_ready",
                "1 when the database entry holds a valid credential and dbward is not shutting down.",
                db,
            ),
            credential_rejected_total: r.counter(
                "dbward_credential_rejected_total",
                "Credentials the upstream refused (28P01) although Vault issued them.",
                db,
            ),
            vault_requests_total: r.counter(
                "dbward_vault_requests_total",
                "Vault requests by operation, status (HTTP code, timeout or unreachable) and the configured address that was asked.",
                &["operation", "status", "address"],
            ),
            vault_failovers_total: r.counter(
                "dbward_vault_failovers_total",
                "Requests that moved on to the next configured Vault address because this one could not answer (no connection, timeout, 5xx, a redirect elsewhere).",
                &["address"],
            ),
            credential_budget_exhausted_total: r.counter(
                "dbward_credential_budget_exhausted_total",
                "New credentials not minted because the entry's minting budget was spent; the newest valid credential was used instead.",
                db,
            ),
            leases_held: r.int_gauge(
                "dbward_leases_held",
                "Vault leases dbward holds now (current and replaced ones still in use or not yet revoked), per database entry.",
                db,
            ),
            vault_request_seconds: r.histogram("dbward_vault_request_seconds", "Vault request latency.", 15, &["operation"]),
            vault_denied_total: r.counter(
                "dbward_vault_denied_total",
                "Vault requests refused with 403, by database entry and operation (read, renew, revoke, renew-self, lookup-self; database is empty for the token's own).",
                &["database", "operation"],
            ),
            vault_token_expiry_timestamp_seconds: r.reg(IntGauge::new(
                "dbward_vault_token_expiry_timestamp_seconds",
                "Unix time at which the current Vault token expires (0: none or no expiry).",
            )),
            vault_token_expires_in_seconds: r.gauge(
                "dbward_vault_token_expires_in_seconds",
                "Seconds until the current Vault token expires (absent before the first login and for tokens without expiry).",
                &[],
            ),
            cancel_requests_total: r.counter(
                "dbward_cancel_requests_total",
                "Cancel requests by result: routed, unknown_key or failed.",
                &["result"],
            ),
            lease_renewals_total: r.counter(
                "dbward_lease_renewals_total",
                "Renewals of leases still used by client connections, by result.",
                &["database", "result"],
            ),
            lease_revocations_total: r.counter(
                "dbward_lease_revocations_total",
                "Lease revocations (unused after replacement, or at shutdown), by result.",
                &["database", "result"],
            ),
            sessions_retired_total: r.counter(
                "dbward_sessions_retired_total",
                "Sessions dbward closed between transactions shortly before their credential's hard end, by reason: lease_max_ttl or token_max_ttl.",
                &["database", "reason"],
            ),
            build_info: r.int_gauge("dbward_build_info", "Always 1; the version label says which build.", &["version"]),
            pool_idle: r.int_gauge(
                "dbward_pool_idle",
                "Idle upstream connections kept for reuse ([databases.pool]).",
                db,
            ),
            pool_reused_total: r.counter(
                "dbward_pool_reused_total",
                "Client sessions served by a kept upstream connection instead of a new one.",
                db,
            ),
            pool_closed_total: r.counter(
                "dbward_pool_closed_total",
                "Kept upstream connections closed, by reason: idle_timeout, credential_replaced, credential_end, server_closed, full, reset_failed, shutdown.",
                &["database", "reason"],
            ),
            registry: r.0,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m
    }

    /// The text exposition format for `/metrics`.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_is_exported_with_the_crate_version() {
        let m = Metrics::new();
        let text = m.render();
        let want = format!("dbward_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert!(text.contains(&want), "{text}");
    }

    #[test]
    fn every_family_is_named_dbward_and_labelled_by_allowed_names_only() {
        let m = Metrics::new();
        // Touch every labelled family once so that it is rendered.
        m.client_connections_total.with_label_values(&["db"]).inc();
        m.credential_expires_in_seconds.with_label_values(&["db"]).set(1.0);
        m.vault_token_expires_in_seconds.with_label_values::<&str>(&[]).set(1.0);
        m.upstream_connect_seconds
            .with_label_values(&["db", "pg:5432"])
            .observe(0.01);
        let allowed = LABEL_NAMES;
        for family in m.registry.gather() {
            assert!(family.name().starts_with("dbward_"), "{}", family.name());
            assert!(!family.help().is_empty(), "{} has no help", family.name());
            for metric in family.get_metric() {
                for label in metric.get_label() {
                    assert!(
                        allowed.contains(&label.name()),
                        "{}: label {}",
                        family.name(),
                        label.name()
                    );
                }
            }
        }
        let text = m.render();
        assert!(text.contains("dbward_vault_token_expires_in_seconds 1"), "{text}");
    }

    #[test]
    fn the_token_gauge_is_absent_until_set() {
        let m = Metrics::new();
        assert!(!m.render().contains("dbward_vault_token_expires_in_seconds"));
    }
}
