//! Keys as the gate knows them: digests, cache entries, and the cache in front of the store.
//!
//! A key is never kept in plaintext: the request's key is hashed (SHA-256) and only the digest is
//! looked up, cached or stored. The cache is two bounded moka caches: positive entries (TTL
//! `cache.ttl`) and negative ones for unknown digests (`cache.negative_ttl`), kept apart so a
//! client spraying random keys can only churn the negative cache, never evict real keys. A miss
//! loads through `try_get_with`, which runs one store lookup per digest however many requests
//! wait for it.
//!
//! Reads do not go to moka on every request. Every moka read goes through one shared read-log
//! channel and may run maintenance inline (moka issue #498); measured here, that held two
//! threads to 1.2× the throughput of one. So moka is the cache's *policy* — capacity, TTL,
//! TinyLFU admission, one load per digest — and a lock-free papaya map mirrors its contents for
//! reads: moka's eviction listener removes what moka drops, invalidation removes from both at
//! once, and each entry goes back to moka once a second (which keeps moka's frequency sketch
//! fed and drops any mirror entry moka no longer has, so the TTL holds to within a second).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::HeaderValue;
use sha2::{Digest as _, Sha256};

use super::heartbeat::Beat;
use super::limits::{Bucket, LimitSet};
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
        f.debug_struct("TeamEntry")
            .field("id", &self.id)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
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
    /// The plan's buckets for this key (shared with the team's other keys when keyed by team).
    pub buckets: Box<[Arc<Bucket>]>,
    /// `x-keygate-key-id`, rendered once.
    pub key_id_header: HeaderValue,
    pub usage: Arc<KeyUsage>,
    /// Monotonic nanoseconds when the cache last confirmed this entry with moka.
    pub checked_ns: AtomicU64,
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
        required.iter().all(|r| {
            self.scopes
                .iter()
                .any(|s| &**s == r.as_str() || &**s == "*")
        })
    }

    /// Revoked, or past its expiry.
    pub fn is_dead(&self, now: UnixMillis) -> bool {
        self.revoked || self.expires_at.is_some_and(|e| now >= e)
    }
}

/// Per-key request counts, kept in memory and flushed to the store in batches.
#[derive(Debug, Default)]
pub struct KeyUsage {
    /// What the store had counted when this process first loaded the key.
    base: AtomicU64,
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

    /// All requests with this key: the store's count at first load plus this process's.
    pub fn total(&self) -> u64 {
        self.base.load(Ordering::Relaxed) + self.count()
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
    /// The counters of a key, made on first use with the store's count as their base (later
    /// loads leave the base alone: the store's count then includes this process's flushes).
    pub fn get(&self, key_id: &str, stored: u64) -> Arc<KeyUsage> {
        let mut map = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key_id.into())
            .or_insert_with(|| {
                Arc::new(KeyUsage {
                    base: AtomicU64::new(stored),
                    ..KeyUsage::default()
                })
            })
            .clone()
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

    /// Requests counted and not yet flushed for one key, and its last use.
    pub fn unflushed(&self, key_id: &str) -> Option<(u64, UnixMillis)> {
        let u = self.peek(key_id)?;
        let c = u.count.load(Ordering::Relaxed);
        let f = u.flushed.load(Ordering::Relaxed);
        Some((c.saturating_sub(f), u.last_used.load(Ordering::Relaxed)))
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

/// How long a mirrored entry answers before it is checked against moka again.
const RECHECK_NS: u64 = 1_000_000_000;

type Mirror = papaya::HashMap<Digest, Arc<KeyEntry>, Hasher>;

/// The key cache: a read mirror over positive and negative moka caches.
pub struct KeyCache {
    mirror: Arc<Mirror>,
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
        let mirror: Arc<Mirror> =
            Arc::new(papaya::HashMap::builder().hasher(Hasher::new()).build());
        let evicted = mirror.clone();
        KeyCache {
            positive: moka::sync::Cache::builder()
                .max_capacity(cfg.capacity)
                .time_to_live(cfg.ttl)
                .eviction_listener(move |d: Arc<Digest>, gone: Arc<KeyEntry>, _| {
                    // Only the entry moka dropped: a reload may already have put a new one there.
                    let _ = evicted
                        .pin()
                        .remove_if(&*d, |_, cur| Arc::ptr_eq(cur, &gone));
                })
                .build_with_hasher(Hasher::new()),
            negative: moka::sync::Cache::builder()
                .max_capacity(cfg.negative_capacity)
                .time_to_live(cfg.negative_ttl)
                .build_with_hasher(Hasher::new()),
            mirror,
        }
    }

    /// Looks a digest up. `now_ns` is monotonic time.
    #[inline]
    pub fn get(&self, d: &Digest, now_ns: u64) -> Cached {
        let found = self.mirror.pin().get(d).cloned();
        if let Some(e) = found {
            let checked = e.checked_ns.load(Ordering::Relaxed);
            if now_ns.wrapping_sub(checked) < RECHECK_NS {
                return Cached::Hit(e);
            }
            // Once a second: tell moka about the read, and make sure it still has the entry.
            match self.positive.get(d) {
                Some(cur) if Arc::ptr_eq(&cur, &e) => {
                    e.checked_ns.store(now_ns, Ordering::Relaxed);
                    return Cached::Hit(e);
                }
                _ => {
                    let _ = self
                        .mirror
                        .pin()
                        .remove_if(d, |_, cur| Arc::ptr_eq(cur, &e));
                    return Cached::Miss;
                }
            }
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
        now_ns: u64,
        init: impl FnOnce() -> Result<Arc<KeyEntry>, LoadError>,
    ) -> Result<Arc<KeyEntry>, LoadError> {
        match self.positive.try_get_with(*d, init) {
            Ok(e) => {
                e.checked_ns.store(now_ns, Ordering::Relaxed);
                self.mirror.pin().insert(*d, e.clone());
                Ok(e)
            }
            Err(e) => {
                if matches!(*e, LoadError::Unknown) {
                    self.negative.insert(*d, ());
                }
                Err((*e).clone())
            }
        }
    }

    /// Forgets one digest at once (revocation).
    pub fn invalidate(&self, d: &Digest) {
        self.mirror.pin().remove(d);
        self.positive.invalidate(d);
        self.negative.invalidate(d);
    }

    /// Forgets everything (reload).
    pub fn invalidate_all(&self) {
        self.mirror.pin().clear();
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
