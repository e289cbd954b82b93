//! The negative cache: a Vault error for a database entry is remembered for
//! `proxy.vault_error_cache`, so a broken policy costs Vault one request per few seconds rather
//! than one per connection. moka's time-to-live does the forgetting; a success forgets at once so
//! a fixed policy is seen by the next client.

use std::time::Duration;

use moka::future::Cache;

use super::CredentialError;

pub(crate) struct RecentErrors(Cache<String, CredentialError>);

impl RecentErrors {
    pub(crate) fn new(ttl: Duration) -> Self {
        RecentErrors(Cache::builder().time_to_live(ttl).build())
    }

    /// The error `database` had less than the TTL ago, if any.
    pub(crate) async fn get(&self, database: &str) -> Option<CredentialError> {
        self.0.get(database).await
    }

    pub(crate) async fn remember(&self, database: &str, e: CredentialError) {
        self.0.insert(database.to_string(), e).await;
    }

    pub(crate) async fn forget(&self, database: &str) {
        self.0.invalidate(database).await;
    }

    pub(crate) fn forget_all(&self) {
        self.0.invalidate_all();
    }
}
