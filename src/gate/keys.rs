//! Keys as the gate knows them: digests, cache entries, and the cache in front of the store.
//!
//! A key is never kept in plaintext: the request's key is hashed (SHA-256) and only the digest is
//! looked up, cached or stored. The cache is two bounded moka caches: positive entries (TTL
//! `cache.ttl`) and negative ones for unknown digests (`cache.negative_ttl`), kept apart so a
//! client spraying random keys can only churn the negative cache, never evict real keys. A miss
//! loads through `try_get_with`, which runs one store lookup per digest however many requests
//! wait for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::HeaderValue;
use sha2::{Digest as _, Sha256};

use super::heartbeat::Beat;
use super::limits::LimitSet;
use crate::clock::UnixMillis;
use crate::config::CacheConfig;

/// SHA-256 of a key.
pub type Digest = [u8; 32];

/// Hashes a presented key.
#[inline]
pub fn digest(key: &[u8]) -> Digest {
    Sha256::digest(key).into()
}

/// A team as resolved for one config snapshot.
pub struct TeamEntry {
    pub id: Arc<str>,
    pub plan: Arc<str>,
    pub limits: Arc<LimitSet>,
    pub beat: Arc<Beat>,
    pub heartbeat_required: bool,
    /// `x-keygate-team`, rendered once.
    pub team_header: HeaderValue,
    /// `x-keygate-plan`, rendered once.
    pub plan_header: HeaderValue,
}

impl std::fmt::Debug for TeamEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeamEntry").field("id", &self.id).field("plan", &self.plan).finish_non_exhaustive()
    }
}

/// A cached key: what the policy step needs, and nothing that could reveal the key.
pub struct KeyEntry {
    pub key_id: Arc<str>,
    pub team: Arc<TeamEntry>,
    pub scopes: Box<[Box<str>]>,
    pub environment: Option<Box<str>>,
    pub expires_at: Option<UnixMillis>,
    pub revoked: bool,
    /// What the plan's buckets are keyed by for this key (team id or key id).
    pub limiter_key: Arc<str>,
    /// `x-keygate-key-id`, rendered once.
    pub key_id_header: HeaderValue,
    pub usage: Arc<KeyUsage>,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("key_id", &self.key_id)
            .field("team", &self.team.id)
            .finish_non_exhaustive()
    }
}

impl KeyEntry {
    /// Whether the key grants every scope in `required` (`*` grants all).
    pub fn has_scopes(&self, required: &[String]) -> bool {
        required
            .iter()
            .all(|r| self.scopes.iter().any(|s| &**s == r.as_str() || &**s == "*"))
    }

    /// Revoked, or past its expiry.
    pub fn is_dead(&self, now: UnixMillis) -> bool {
        self.revoked || self.expires_at.is_some_and(|e| now >= e)
    }
}

/// Per-key request counts, kept in memory and flushed to the store in batches.
#[derive(Debug, Default)]
pub struct KeyUsage {
    count: AtomicU64,
    flushed: AtomicU64,
    last_used: AtomicI64,
}

impl KeyUsage {
    #[inline]
    pub fn hit(&self, now: UnixMillis) {
        self.count.fetch_add(1, Ordering::Relaxed);
        // Only write the time when it moves by a second: keeps the line shared between readers.
        if now - self.last_used.load(Ordering::Relaxed) >= 1_000 {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// Requests counted since the process started.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn last_used(&self) -> Option<UnixMillis> {
        Some(self.last_used.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }
}

/// Usage counters by key id, outside the cache so an eviction loses no count.
#[derive(Debug, Default)]
pub struct UsageRegistry {
    keys: Mutex<HashMap<Arc<str>, Arc<KeyUsage>>>,
}

impl UsageRegistry {
    pub fn get(&self, key_id: &str) -> Arc<KeyUsage> {
        let mut map = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key_id.into()).or_default().clone()
    }

    pub fn peek(&self, key_id: &str) -> Option<Arc<KeyUsage>> {
        let map = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key_id).cloned()
    }

    /// Counts not yet flushed: (key id, delta, last used). Call [`UsageRegistry::commit`] after
    /// a successful write, or nothing to retry it next time.
    pub fn pending(&self) -> Vec<(String, u64, UnixMillis)> {
        let map = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter_map(|(id, u)| {
                let c = u.count.load(Ordering::Relaxed);
                let f = u.flushed.load(Ordering::Relaxed);
                (c > f).then(|| (id.to_string(), c - f, u.last_used.load(Ordering::Relaxed)))
            })
            .collect()
    }

    /// Marks a batch from [`UsageRegistry::pending`] as written.
    pub fn commit(&self, batch: &[(String, u64, UnixMillis)]) {
        let map = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for (id, delta, _) in batch {
            if let Some(u) = map.get(id.as_str()) {
                u.flushed.fetch_add(*delta, Ordering::Relaxed);
            }
        }
    }
}

/// Why a cache miss could not produce an entry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("unknown key")]
    Unknown,
    #[error("{0}")]
    Store(String),
}

type Hasher = ahash::RandomState;

/// The key cache: positive and negative moka caches.
pub struct KeyCache {
    positive: moka::sync::Cache<Digest, Arc<KeyEntry>, Hasher>,
    negative: moka::sync::Cache<Digest, (), Hasher>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("entries", &self.positive.entry_count())
            .field("negative", &self.negative.entry_count())
            .finish()
    }
}

/// What the cache knows of a digest without loading.
pub enum Cached {
    Hit(Arc<KeyEntry>),
    KnownUnknown,
    Miss,
}

impl KeyCache {
    pub fn new(cfg: &CacheConfig) -> Self {
        KeyCache {
            positive: moka::sync::Cache::builder()
                .max_capacity(cfg.capacity)
                .time_to_live(cfg.ttl)
                .build_with_hasher(Hasher::new()),
            negative: moka::sync::Cache::builder()
                .max_capacity(cfg.negative_capacity)
                .time_to_live(cfg.negative_ttl)
                .build_with_hasher(Hasher::new()),
        }
    }

    #[inline]
    pub fn get(&self, d: &Digest) -> Cached {
        if let Some(e) = self.positive.get(d) {
            return Cached::Hit(e);
        }
        if self.negative.contains_key(d) {
            return Cached::KnownUnknown;
        }
        Cached::Miss
    }

    /// Loads a digest, once per digest however many callers wait. Blocking: call it off the
    /// async workers.
    pub fn load(
        &self,
        d: &Digest,
        init: impl FnOnce() -> Result<Arc<KeyEntry>, LoadError>,
    ) -> Result<Arc<KeyEntry>, LoadError> {
        match self.positive.try_get_with(*d, init) {
            Ok(e) => Ok(e),
            Err(e) => {
                if matches!(*e, LoadError::Unknown) {
                    self.negative.insert(*d, ());
                }
                Err((*e).clone())
            }
        }
    }

    pub fn insert(&self, d: Digest, e: Arc<KeyEntry>) {
        self.negative.invalidate(&d);
        self.positive.insert(d, e);
    }

    pub fn invalidate(&self, d: &Digest) {
        self.positive.invalidate(d);
        self.negative.invalidate(d);
    }

    pub fn invalidate_all(&self) {
        self.positive.invalidate_all();
        self.negative.invalidate_all();
    }

    /// Entry counts (positive, negative), after running pending maintenance.
    pub fn counts(&self) -> (u64, u64) {
        self.positive.run_pending_tasks();
        self.negative.run_pending_tasks();
        (self.positive.entry_count(), self.negative.entry_count())
    }
}
