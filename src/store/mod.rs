//! Key stores: where key records, teams and persisted state live.
//!
//! The gate sees only the [`KeyStore`] trait (a digest in, a record out) so that the embedded
//! SQLite store, the declarative config and a future PostgreSQL backend are interchangeable.
//! Calls are blocking; the proxy runs them on tokio's blocking pool, never on a worker thread.

pub mod sqlite;

use crate::clock::UnixMillis;
use crate::config::LimitSpec;

/// A key record as stored: never the key itself, only what is known about it.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// Public identifier, safe to log and show.
    pub key_id: String,
    pub team_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub environment: Option<String>,
    pub created_at: UnixMillis,
    pub expires_at: Option<UnixMillis>,
    pub revoked_at: Option<UnixMillis>,
    /// The first characters of the key, for people to recognise it (`sk_live_AbC…`).
    pub visible_prefix: String,
    /// Requests counted in the store so far (usage is flushed in batches).
    pub use_count: u64,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("revoked", &self.revoked_at.is_some())
            .finish_non_exhaustive()
    }
}

/// A team record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTeam {
    pub id: String,
    /// A plan name from the config, or `None` with custom `limits`.
    pub plan: Option<String>,
    pub limits: Vec<LimitSpec>,
    pub heartbeat_required: Option<bool>,
}

/// Why a store call failed. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid: {0}")]
    Invalid(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Lookups the gate makes on a cache miss.
pub trait KeyStore: Send + Sync + 'static {
    /// The key whose SHA-256 digest this is, if any.
    fn find_key(&self, digest: &[u8; 32]) -> Result<Option<StoredKey>, StoreError>;
    /// A team not declared in the config.
    fn find_team(&self, id: &str) -> Result<Option<StoredTeam>, StoreError>;

    /// Whether lookups answer from memory without blocking, so a cache miss may be resolved on
    /// the async worker instead of the blocking pool. Backends that do I/O keep the default.
    fn is_in_memory(&self) -> bool {
        false
    }
}

/// State the gate keeps in memory and persists in batches.
pub trait StateStore: Send + Sync + 'static {
    fn load_heartbeats(&self) -> Result<Vec<(String, UnixMillis)>, StoreError>;
    fn save_heartbeats(&self, beats: &[(String, UnixMillis)]) -> Result<(), StoreError>;
    /// Adds request counts and last-used times (key id, count delta, last used).
    fn add_usage(&self, usage: &[(String, u64, UnixMillis)]) -> Result<(), StoreError>;
}

/// A store with nothing in it: the config's declared teams are the only keys.
#[derive(Debug, Default)]
pub struct NoStore;

impl KeyStore for NoStore {
    fn find_key(&self, _: &[u8; 32]) -> Result<Option<StoredKey>, StoreError> {
        Ok(None)
    }
    fn find_team(&self, _: &str) -> Result<Option<StoredTeam>, StoreError> {
        Ok(None)
    }

    fn is_in_memory(&self) -> bool {
        true
    }
}

impl StateStore for NoStore {
    fn load_heartbeats(&self) -> Result<Vec<(String, UnixMillis)>, StoreError> {
        Ok(Vec::new())
    }
    fn save_heartbeats(&self, _: &[(String, UnixMillis)]) -> Result<(), StoreError> {
        Ok(())
    }
    fn add_usage(&self, _: &[(String, u64, UnixMillis)]) -> Result<(), StoreError> {
        Ok(())
    }
}
