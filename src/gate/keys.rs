//! Keys as the gate knows them: digests, cache entries, and the cache in front of the store.
//!
//! A key is never kept in plaintext: the request's key is hashed (SHA-256) and only the digest is
//! looked up, cached or stored. The cache has two sides, kept apart so a client spraying random
//! keys can only churn the negative side, never evict real keys:
//!
//! - **Negative** (unknown digests): a moka cache bounded by `cache.negative_capacity`, entries
//!   dropped after `cache.negative_ttl`. Only misses reach it, so moka's per-read cost does not
//!   matter there, and its admission policy is what a spray of random digests needs.
//! - **Positive** (known keys): [`KeyCache`]'s own table, written for memory per entry. It used
//!   to be a moka cache plus a lock-free papaya map mirroring it for reads (moka's reads go
//!   through one shared read-log channel and held two threads to 1.2× one). Measured, that design
//!   took 1,321 MiB RSS for 1,000,000 keys, 1,418 heap bytes per key in `tests/memory.rs`, of
//!   which moka's and the mirror's entries were several hundred; this table costs a 64-byte
//!   slot (the entry inline) and an index cell (4 bytes and a control byte) per key
//!   (BENCHMARKS.md, "Memory").
//!
//!   It is up to [`SHARDS`] shards picked by a digest byte, each a lock over an index
//!   (`hashbrown::HashTable<u32>`) into a slab of slots with a free list. A read takes one
//!   shard's read lock, finds the slot, sets its *referenced* bit if not set yet (so a hot
//!   key's line is not written on every read) and lets the gate decide on the entry in place
//!   ([`KeyCache::with_hit`]), so a hit touches no reference count; `benches/auth_check`
//!   measures it no slower than the mirror. An
//!   insert at the shard's capacity (`cache.capacity` / shards, so a cache whose shards fill
//!   unevenly evicts a little before `cache.capacity` keys) evicts with CLOCK: the hand clears
//!   referenced bits and takes the first slot that is unreferenced or expired. Entries expire
//!   `cache.ttl` after their insert (to the second, rounded down), in the monotonic time the gate
//!   passes in (so tests drive it with the manual clock); an expired entry is a miss at once, its
//!   slot reclaimed by the hand or by [`KeyCache::prune_expired`] (every minute).
//!
//!   The lock is crossbeam's `ShardedLock`: a reader writes only its own thread's counter, on a
//!   line of its own. With a plain `RwLock` every read wrote the shard's lock word, and with two
//!   threads busy that line moved between their cores on nearly every read (64 shards are all
//!   touched within microseconds): in `benches/auth_check`, two threads did fewer checks than one
//!   (0.77×); with it, 1.04× (BENCHMARKS.md). Writes (inserts, eviction) take every reader
//!   counter and are rarer than reads by orders of magnitude.
//!
//! A miss is loaded once per digest however many requests wait for it: the first caller runs
//! the store lookup, later ones block on its result (loads run on the blocking pool), and get its
//! error too if it failed. Invalidation takes effect at once, also against a load already running:
//! each invalidation moves a generation counter, and a load whose lookup started before it does
//! not cache its result.
//!
//! What a key is beyond the cache — its id (the `x-keygate-key-id` value is made over it per
//! request, without an allocation) and its usage counters — is kept in the [`UsageRegistry`]
//! for the life of the process (counts must survive eviction and reload), in slabs that are
//! never freed, so an entry refers to it with a plain `&'static` reference: no allocation, no
//! reference count per key or per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use bytes::Bytes;
use crossbeam_utils::sync::ShardedLock;
use hashbrown::HashTable;
use http::HeaderValue;
use sha2::{Digest as _, Sha256};

use super::heartbeat::Beat;
use super::limits::{Bucket, Buckets, LimitSet};
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
///
/// Its id and plan name are the bytes of its two header values ([`Names`]) and its beat is the
/// heartbeat registry's record, all kept for the life of the process: plain references, where
/// the entry used to hold its own copy of the id and count references to the plan and beat.
pub struct TeamEntry {
    pub id: Name,
    pub plan: Name,
    pub limits: Arc<LimitSet>,
    /// The team's buckets when limits are keyed by team (shared by all its keys), else empty.
    pub buckets: Buckets,
    pub beat: &'static Beat,
    pub heartbeat_required: bool,
    /// `x-keygate-team`, rendered once for the life of the process ([`Names`]).
    pub team_header: &'static HeaderValue,
    /// `x-keygate-plan`, rendered once for the life of the process ([`Names`]).
    pub plan_header: &'static HeaderValue,
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
///
/// Held by value in its cache slot (no allocation of its own). The gate decides on it in place
/// and hands the proxy a [`KeyView`]; a clone (one reference count on the team, and on the
/// extras if any) is made only for the usage answer.
#[derive(Clone)]
pub struct KeyEntry {
    pub team: Arc<TeamEntry>,
    pub usage: &'static KeyUsage,
    /// Scopes, environment, expiry, revocation, buckets of its own: most keys have none of
    /// them, and then this costs no allocation. Inline they would more than double the entry.
    extras: Option<Arc<Extras>>,
}

struct Extras {
    scopes: Box<[Box<str>]>,
    environment: Option<Box<str>>,
    expires_at: Option<UnixMillis>,
    revoked: bool,
    /// The key's own buckets when limits are keyed by key.
    buckets: Buckets,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("key_id", &self.key_id())
            .field("team", &self.team.id)
            .finish_non_exhaustive()
    }
}

/// What the proxy needs of a key once the gate has decided: its identity headers and its
/// limits' names, all kept for the life of the process. Holding it touches no reference count:
/// when every granted request held a clone of its [`KeyEntry`], the team's count was written
/// twice per request, and two threads granting keys took that line from each other's cache
/// (the largest cost left in `benches/auth_check` with two threads; BENCHMARKS.md).
#[derive(Debug, Clone, Copy)]
pub struct KeyView {
    pub usage: &'static KeyUsage,
    /// `x-keygate-team`.
    pub team_header: &'static HeaderValue,
    /// `x-keygate-plan`.
    pub plan_header: &'static HeaderValue,
    /// `RateLimit-Policy`.
    pub policy_header: &'static HeaderValue,
    /// The limits' name in `RateLimit`.
    pub limits_name: &'static HeaderValue,
}

impl KeyView {
    /// `x-keygate-key-id`: over the id's process-lifetime bytes, so no allocation.
    #[inline]
    pub fn key_id_header(&self) -> HeaderValue {
        self.usage.header()
    }
}

impl KeyEntry {
    /// `buckets`: the key's own, when limits are keyed by key (else the team's are used).
    pub fn new(
        team: Arc<TeamEntry>,
        buckets: Buckets,
        usage: &'static KeyUsage,
        scopes: &[String],
        environment: Option<&str>,
        expires_at: Option<UnixMillis>,
        revoked: bool,
    ) -> KeyEntry {
        let plain = scopes.is_empty()
            && environment.is_none()
            && expires_at.is_none()
            && !revoked
            && buckets.is_empty();
        let extras = (!plain).then(|| {
            Arc::new(Extras {
                scopes: scopes.iter().map(|s| s.as_str().into()).collect(),
                environment: environment.map(Into::into),
                expires_at,
                revoked,
                buckets,
            })
        });
        KeyEntry {
            team,
            usage,
            extras,
        }
    }

    #[inline]
    pub fn view(&self) -> KeyView {
        KeyView {
            usage: self.usage,
            team_header: self.team.team_header,
            plan_header: self.team.plan_header,
            policy_header: self.team.limits.policy_header,
            limits_name: self.team.limits.name_header,
        }
    }

    /// The plan's buckets for this key: its own, or its team's.
    #[inline]
    pub fn buckets(&self) -> &[Arc<Bucket>] {
        match &self.extras {
            Some(x) if !x.buckets.is_empty() => &x.buckets,
            _ => &self.team.buckets,
        }
    }

    /// When the key stops being valid, if ever.
    pub fn expires_at(&self) -> Option<UnixMillis> {
        self.extras.as_ref().and_then(|x| x.expires_at)
    }

    pub fn revoked(&self) -> bool {
        self.extras.as_ref().is_some_and(|x| x.revoked)
    }

    /// The key's public id.
    pub fn key_id(&self) -> &str {
        self.usage.key_id()
    }

    pub fn scopes(&self) -> &[Box<str>] {
        self.extras.as_ref().map_or(&[], |x| &x.scopes)
    }

    pub fn environment(&self) -> Option<&str> {
        self.extras.as_ref().and_then(|x| x.environment.as_deref())
    }

    /// Whether the key grants every scope in `required` (`*` grants all).
    pub fn has_scopes(&self, required: &[String]) -> bool {
        let scopes = self.scopes();
        required
            .iter()
            .all(|r| scopes.iter().any(|s| &**s == r.as_str() || &**s == "*"))
    }

    /// Revoked, or past its expiry.
    #[inline]
    pub fn is_dead(&self, now: UnixMillis) -> bool {
        self.extras
            .as_ref()
            .is_some_and(|x| x.revoked || x.expires_at.is_some_and(|e| now >= e))
    }
}

/// A key's id and request counts, kept in memory and flushed to the store in batches.
#[derive(Debug)]
pub struct KeyUsage {
    /// The key id, in the registry's process-lifetime text (checked to be a header value).
    id: &'static str,
    /// All requests with this key: the store's count when this process first loaded the key,
    /// plus this process's.
    count: AtomicU64,
    /// How much of `count` the store has: the store's count at first load, plus the flushes.
    flushed: AtomicU64,
    last_used: AtomicI64,
}

impl KeyUsage {
    /// A record not in use, filling a slab's free places.
    fn blank() -> KeyUsage {
        KeyUsage {
            id: "",
            count: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            last_used: AtomicI64::new(0),
        }
    }

    /// The key's public id.
    pub fn key_id(&self) -> &str {
        self.id
    }

    /// The key id as a header value, made per request: 16 bytes kept per key instead of a
    /// 40-byte `HeaderValue`, and making one over static bytes allocates nothing.
    #[inline]
    pub fn header(&self) -> HeaderValue {
        HeaderValue::from_maybe_shared(Bytes::from_static(self.id.as_bytes()))
            .unwrap_or(HeaderValue::from_static(""))
    }

    #[inline]
    pub fn hit(&self, now: UnixMillis) {
        self.count.fetch_add(1, Ordering::Relaxed);
        // Only write the time when it moves by a second: keeps the line shared between readers.
        if now - self.last_used.load(Ordering::Relaxed) >= 1_000 {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// All requests with this key: the store's count at first load plus this process's.
    pub fn total(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn last_used(&self) -> Option<UnixMillis> {
        Some(self.last_used.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }
}

/// Usage counters by key id, outside the cache so an eviction loses no count.
///
/// A key's record is made on first load and kept for the life of the process, as the plain
/// `HashMap` this replaces kept it: the records and the id bytes live in slabs leaked on purpose
/// (never freed, never moved), which is what lets cache entries hold `&'static` references and
/// the key-id header be made without an allocation or a reference count. They cost 40 bytes
/// plus the id per key ever loaded, where the map cost a second copy of the id, an `Arc` and its slot.
#[derive(Debug, Default)]
pub struct UsageRegistry {
    inner: Mutex<Usages>,
}

#[derive(Debug, Default)]
struct Usages {
    by_id: HashTable<&'static KeyUsage>,
    hasher: Hasher,
    records: Slab<KeyUsage>,
    text: Text,
}

impl Usages {
    fn find(&self, key_id: &str) -> Option<&'static KeyUsage> {
        let h = self.hasher.hash_one(key_id.as_bytes());
        self.by_id.find(h, |u| u.id == key_id).copied()
    }
}

impl UsageRegistry {
    /// The counters of a key, made on first use with the store's count as their base (later
    /// loads leave the base alone: the store's count then includes this process's flushes).
    /// `None` when the id cannot be a header value (such a key is refused).
    pub fn get(&self, key_id: &str, stored: u64) -> Option<&'static KeyUsage> {
        let mut u = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = u.find(key_id) {
            return Some(found);
        }
        // Checked before anything is kept for it.
        if !header_text(key_id.as_bytes()) {
            return None;
        }
        let id = u.text.copy_str(key_id);
        let usage = u.records.put(
            KeyUsage {
                id,
                count: AtomicU64::new(stored),
                flushed: AtomicU64::new(stored),
                last_used: AtomicI64::new(0),
            },
            KeyUsage::blank,
        );
        let Usages { by_id, hasher, .. } = &mut *u;
        by_id.insert_unique(hasher.hash_one(key_id.as_bytes()), usage, |r| {
            hasher.hash_one(r.id.as_bytes())
        });
        Some(usage)
    }

    pub fn peek(&self, key_id: &str) -> Option<&'static KeyUsage> {
        let u = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        u.find(key_id)
    }

    /// Counts not yet flushed: (key id, delta, last used). Call [`UsageRegistry::commit`] after
    /// a successful write, or nothing to retry it next time.
    pub fn pending(&self) -> Vec<(String, u64, UnixMillis)> {
        let u = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        u.by_id
            .iter()
            .filter_map(|u| {
                let c = u.count.load(Ordering::Relaxed);
                let f = u.flushed.load(Ordering::Relaxed);
                (c > f).then(|| {
                    (
                        u.key_id().to_owned(),
                        c - f,
                        u.last_used.load(Ordering::Relaxed),
                    )
                })
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
        let u = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, delta, _) in batch {
            if let Some(r) = u.find(id) {
                r.flushed.fetch_add(*delta, Ordering::Relaxed);
            }
        }
    }
}

/// Header values of names (team ids, plan names) rendered once for the life of the process, so
/// a team entry holds two `&'static` references instead of two `HeaderValue`s, each with its
/// own allocation and, once cloned, a shared block and a reference count touched per request.
/// Teams are bounded by the store (the heartbeat registry keeps every team id for good, too).
#[derive(Debug, Default)]
pub struct Names {
    inner: Mutex<NameTable>,
}

#[derive(Debug, Default)]
struct NameTable {
    by_text: HashTable<&'static HeaderValue>,
    hasher: Hasher,
    values: Slab<HeaderValue>,
    text: Text,
}

impl Names {
    /// `name` as a header value; `None` if it cannot be one.
    pub fn header(&self, name: &str) -> Option<&'static HeaderValue> {
        let mut t = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let h = t.hasher.hash_one(name.as_bytes());
        if let Some(v) = t.by_text.find(h, |v| v.as_bytes() == name.as_bytes()) {
            return Some(*v);
        }
        if !header_text(name.as_bytes()) {
            return None;
        }
        let text = t.text.copy(name.as_bytes());
        let value = HeaderValue::from_maybe_shared(Bytes::from_static(text)).ok()?;
        let value = t.values.put(value, || HeaderValue::from_static(""));
        let NameTable {
            by_text, hasher, ..
        } = &mut *t;
        by_text.insert_unique(h, value, |v| hasher.hash_one(v.as_bytes()));
        Some(value)
    }

    /// `name` as text and as a header value, both over the same process-lifetime bytes; `None`
    /// if it cannot be a header value.
    pub fn get(&self, name: &str) -> Option<(Name, &'static HeaderValue)> {
        let value = self.header(name)?;
        // The value's bytes are a copy of `name`'s, so UTF-8.
        Some((Name(std::str::from_utf8(value.as_bytes()).ok()?), value))
    }
}

/// A team id or plan name as a team entry holds it: text kept for the life of the process
/// ([`Names`]), read as a `str` as the `Arc<str>` it replaces was, with no count to keep.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Name(&'static str);

impl Name {
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl From<&'static str> for Name {
    fn from(s: &'static str) -> Name {
        Name(s)
    }
}

impl std::ops::Deref for Name {
    type Target = str;

    #[inline]
    fn deref(&self) -> &str {
        self.0
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.0, f)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// What `HeaderValue::from_bytes` accepts, checked without its copy.
fn header_text(b: &[u8]) -> bool {
    b.iter().all(|&c| (c >= 32 && c != 127) || c == b'\t')
}

/// Values that live as long as the process, in leaked chunks: one allocation per chunk instead
/// of one per value, and `&'static` references to hand out.
#[derive(Debug)]
pub(super) struct Slab<T: 'static> {
    free: &'static mut [T],
    chunk: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            free: &mut [],
            chunk: 0,
        }
    }
}

impl<T> Slab<T> {
    pub(super) fn put(&mut self, value: T, blank: fn() -> T) -> &'static T {
        if self.free.is_empty() {
            // Small at first (tests make many registries), then 1,024 values a chunk.
            self.chunk = (self.chunk * 2).clamp(16, 1024);
            self.free = (0..self.chunk).map(|_| blank()).collect::<Vec<_>>().leak();
        }
        let Some((slot, rest)) = std::mem::take(&mut self.free).split_first_mut() else {
            unreachable!("refilled above")
        };
        self.free = rest;
        *slot = value;
        slot
    }
}

/// Byte strings that live as long as the process, packed into leaked 4 KiB chunks.
#[derive(Debug, Default)]
pub(super) struct Text {
    free: &'static mut [u8],
}

impl Text {
    const CHUNK: usize = 4096;

    fn copy(&mut self, s: &[u8]) -> &'static [u8] {
        if s.len() > Self::CHUNK / 16 {
            return s.to_vec().leak();
        }
        if self.free.len() < s.len() {
            self.free = vec![0; Self::CHUNK].leak();
        }
        let (head, rest) = std::mem::take(&mut self.free).split_at_mut(s.len());
        head.copy_from_slice(s);
        self.free = rest;
        head
    }

    pub(super) fn copy_str(&mut self, s: &str) -> &'static str {
        match std::str::from_utf8(self.copy(s.as_bytes())) {
            Ok(s) => s,
            Err(_) => unreachable!("a copy of a str's bytes is UTF-8"),
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

/// Shards of the positive cache at most (fewer for small capacities, so each holds at least 16).
pub const SHARDS: usize = 64;

/// One cached key.
struct Slot {
    digest: Digest,
    /// `None` while the slot is on the free list.
    entry: Option<KeyEntry>,
    /// Monotonic seconds from which the entry is a miss (rounded down: an entry never outlives
    /// `cache.ttl`; 32 bits instead of 64 make the slot 64 bytes instead of 72).
    expires_s: u32,
    /// Read since the CLOCK hand last passed.
    referenced: AtomicBool,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            digest: [0; 32],
            entry: None,
            expires_s: 0,
            referenced: AtomicBool::new(false),
        }
    }
}

/// A shard's slots, in chunks of a fixed power-of-two size that never move: the slab grows a
/// chunk at a time and is never reallocated. (Grown as one `Vec`, the copies each growth left
/// behind in glibc's per-thread arenas cost 13 MiB more RSS with 1,000,000 keys.)
#[derive(Default)]
struct Slots {
    chunks: Vec<Box<[Slot]>>,
    /// log2 of the chunk size.
    bits: u32,
    len: usize,
}

impl Slots {
    /// Chunks of a sixteenth of the shard's capacity, 512 slots (32 KiB) at most: a shard
    /// fills at most one chunk partly.
    fn new(capacity: usize) -> Slots {
        Slots {
            chunks: Vec::new(),
            bits: (capacity / 16)
                .clamp(1, 512)
                .next_power_of_two()
                .trailing_zeros(),
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, slot: Slot) -> u32 {
        let i = self.len;
        if i >> self.bits == self.chunks.len() {
            self.chunks
                .push((0..1usize << self.bits).map(|_| Slot::empty()).collect());
        }
        self.len += 1;
        self[i] = slot;
        i as u32
    }
}

impl std::ops::Index<usize> for Slots {
    type Output = Slot;

    #[inline]
    fn index(&self, i: usize) -> &Slot {
        &self.chunks[i >> self.bits][i & ((1 << self.bits) - 1)]
    }
}

impl std::ops::IndexMut<usize> for Slots {
    #[inline]
    fn index_mut(&mut self, i: usize) -> &mut Slot {
        &mut self.chunks[i >> self.bits][i & ((1 << self.bits) - 1)]
    }
}

/// A shard: an index over a slab of slots.
#[derive(Default)]
struct Shard {
    /// Slot numbers, hashed by the digest's first 8 bytes. Digests are SHA-256 of secret keys
    /// and only keys the store knows are inserted, so nobody can choose colliding hashes: no
    /// keyed hasher is needed.
    index: HashTable<u32>,
    slots: Slots,
    free: Vec<u32>,
    /// The CLOCK hand: the next slot to consider for eviction.
    hand: usize,
}

const NS: u64 = 1_000_000_000;

#[inline]
fn expired(now_ns: u64, expires_s: u32) -> bool {
    now_ns / NS >= u64::from(expires_s)
}

#[inline]
fn index_hash(d: &Digest) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

impl Shard {
    fn new(capacity: usize) -> Shard {
        Shard {
            slots: Slots::new(capacity),
            ..Shard::default()
        }
    }

    #[inline]
    fn find(&self, d: &Digest) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(index_hash(d), |&i| slots[i as usize].digest == *d)
            .map(|&i| i as usize)
    }

    fn remove(&mut self, i: usize) -> Option<KeyEntry> {
        if let Ok(found) = self
            .index
            .find_entry(index_hash(&self.slots[i].digest), |&j| j as usize == i)
        {
            found.remove();
        }
        let gone = self.slots[i].entry.take();
        if gone.is_some() {
            self.free.push(i as u32);
        }
        gone
    }

    /// CLOCK: the first slot, from the hand on, that is expired or was not read since the hand
    /// last passed (clearing the bits of those that were). Ends within two turns.
    fn evict(&mut self, now_ns: u64) -> Option<KeyEntry> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        for _ in 0..=2 * n {
            if self.hand >= n {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            let s = &mut self.slots[i];
            if s.entry.is_some()
                && (expired(now_ns, s.expires_s) || !std::mem::take(s.referenced.get_mut()))
            {
                return self.remove(i);
            }
        }
        None
    }

    /// Puts an entry in; returns what it replaced or evicted, to be dropped outside the lock.
    fn put(
        &mut self,
        d: &Digest,
        entry: KeyEntry,
        expires_s: u32,
        capacity: usize,
        now_ns: u64,
    ) -> Option<KeyEntry> {
        if let Some(i) = self.find(d) {
            let s = &mut self.slots[i];
            s.expires_s = expires_s;
            *s.referenced.get_mut() = false;
            return s.entry.replace(entry);
        }
        let evicted = if self.index.len() >= capacity {
            self.evict(now_ns)
        } else {
            None
        };
        let slot = Slot {
            digest: *d,
            entry: Some(entry),
            expires_s,
            referenced: AtomicBool::new(false),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => self.slots.push(slot),
        };
        let Shard { index, slots, .. } = self;
        index.insert_unique(index_hash(d), i, |&j| index_hash(&slots[j as usize].digest));
        evicted
    }
}

/// Keeps two shards' tables off one cache line (a write to one would evict readers of the other).
#[repr(align(128))]
struct Padded<T>(T);

/// A load in progress, which later callers for the same digest wait on.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Result<KeyEntry, LoadError>>>,
    done: Condvar,
}

impl Flight {
    fn wait(&self) -> Result<KeyEntry, LoadError> {
        let mut r = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = &*r {
                return r.clone();
            }
            r = self.done.wait(r).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The leader of a [`Flight`]: publishes its result when dropped — an error if the lookup
/// panicked — so waiters never hang.
struct Lead<'a> {
    cache: &'a KeyCache,
    digest: Digest,
    flight: Arc<Flight>,
    result: Option<Result<KeyEntry, LoadError>>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err(LoadError::Store("the key lookup failed".into())));
        self.cache
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.digest);
        *self
            .flight
            .result
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(result);
        self.flight.done.notify_all();
    }
}

/// The key cache: positive entries in sharded slabs, negative ones in moka.
pub struct KeyCache {
    shards: Box<[Padded<ShardedLock<Shard>>]>,
    shard_capacity: usize,
    ttl_ns: u64,
    /// Moved by every invalidation; a load that started under another value does not cache.
    generation: AtomicU64,
    flights: Mutex<HashMap<Digest, Arc<Flight>>>,
    negative: moka::sync::Cache<Digest, (), Hasher>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("shards", &self.shards.len())
            .field("shard_capacity", &self.shard_capacity)
            .field("negative", &self.negative.entry_count())
            .finish()
    }
}

/// What the cache knows of a digest without loading.
pub enum Cached {
    Hit(KeyEntry),
    KnownUnknown,
    Miss,
}

impl KeyCache {
    pub fn new(cfg: &CacheConfig) -> Self {
        let capacity = usize::try_from(cfg.capacity).unwrap_or(usize::MAX);
        // A power of two, at most SHARDS, with at least 16 entries a shard when that allows.
        let mut shards = 1;
        while shards < SHARDS && shards * 2 * 16 <= capacity {
            shards *= 2;
        }
        let shard_capacity = (capacity / shards).max(1);
        KeyCache {
            shards: (0..shards)
                .map(|_| Padded(ShardedLock::new(Shard::new(shard_capacity))))
                .collect(),
            shard_capacity,
            ttl_ns: u64::try_from(cfg.ttl.as_nanos()).unwrap_or(u64::MAX),
            generation: AtomicU64::new(0),
            flights: Mutex::new(HashMap::new()),
            negative: moka::sync::Cache::builder()
                .max_capacity(cfg.negative_capacity)
                .time_to_live(cfg.negative_ttl)
                .build_with_hasher(Hasher::new()),
        }
    }

    #[inline]
    fn shard(&self, d: &Digest) -> &ShardedLock<Shard> {
        // The last byte: independent of the first eight, which the shard's index hashes.
        &self.shards[d[31] as usize & (self.shards.len() - 1)].0
    }

    /// Looks a digest up. `now_ns` is monotonic time.
    #[inline]
    pub fn get(&self, d: &Digest, now_ns: u64) -> Cached {
        if let Some(e) = self.with_hit(d, now_ns, KeyEntry::clone) {
            return Cached::Hit(e);
        }
        if self.known_unknown(d) {
            return Cached::KnownUnknown;
        }
        Cached::Miss
    }

    /// `f` of a live cached entry, in place: under the shard's read lock, which is a write to
    /// this thread's own counter only, so `f` must be short and must not block (the gate's
    /// policy step: a few comparisons and one CAS per bucket). `None` on a miss.
    #[inline]
    pub fn with_hit<R>(
        &self,
        d: &Digest,
        now_ns: u64,
        f: impl FnOnce(&KeyEntry) -> R,
    ) -> Option<R> {
        let shard = self.shard(d).read().unwrap_or_else(PoisonError::into_inner);
        let slot = &shard.slots[shard.find(d)?];
        if expired(now_ns, slot.expires_s) {
            return None;
        }
        // Written only when it changes, so readers of a hot key keep sharing its line.
        if !slot.referenced.load(Ordering::Relaxed) {
            slot.referenced.store(true, Ordering::Relaxed);
        }
        slot.entry.as_ref().map(f)
    }

    /// Whether the digest is cached as not a key.
    #[inline]
    pub fn known_unknown(&self, d: &Digest) -> bool {
        self.negative.contains_key(d)
    }

    /// Loads a digest, once per digest however many callers wait: the first runs `init`, the
    /// others block until it is done and get its result. Blocking: call it off the async workers.
    pub fn load(
        &self,
        d: &Digest,
        now_ns: u64,
        init: impl FnOnce() -> Result<KeyEntry, LoadError>,
    ) -> Result<KeyEntry, LoadError> {
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
            // Under the lock: a leader caches its entry before it leaves the table, so a caller
            // that missed both would find it here.
            if let Some(e) = self.with_hit(d, now_ns, KeyEntry::clone) {
                return Ok(e);
            }
            if let Some(f) = flights.get(d) {
                let f = f.clone();
                drop(flights);
                return f.wait();
            }
            let f = Arc::new(Flight::default());
            flights.insert(*d, f.clone());
            f
        };
        let mut lead = Lead {
            cache: self,
            digest: *d,
            flight,
            result: None,
        };
        let generation = self.generation.load(Ordering::SeqCst);
        let result = init();
        match &result {
            Ok(e) => self.insert(d, e.clone(), now_ns, generation),
            Err(LoadError::Unknown) => {
                if self.generation.load(Ordering::SeqCst) == generation {
                    self.negative.insert(*d, ());
                }
            }
            Err(LoadError::Store(_)) => {}
        }
        lead.result = Some(result.clone());
        result
    }

    /// Caches a loaded entry, unless the cache was invalidated since `generation` was read.
    fn insert(&self, d: &Digest, entry: KeyEntry, now_ns: u64, generation: u64) {
        let mut shard = self
            .shard(d)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let expires_s = u32::try_from(now_ns.saturating_add(self.ttl_ns) / NS).unwrap_or(u32::MAX);
        let gone = shard.put(d, entry, expires_s, self.shard_capacity, now_ns);
        drop(shard);
        drop(gone);
    }

    /// Forgets one digest at once (revocation).
    pub fn invalidate(&self, d: &Digest) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut shard = self
            .shard(d)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let gone = shard.find(d).and_then(|i| shard.remove(i));
        drop(shard);
        drop(gone);
        self.negative.invalidate(d);
    }

    /// Forgets everything (reload).
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for s in &*self.shards {
            let mut shard = s.0.write().unwrap_or_else(PoisonError::into_inner);
            let gone = std::mem::replace(&mut *shard, Shard::new(self.shard_capacity));
            drop(shard);
            drop(gone);
        }
        self.negative.invalidate_all();
    }

    /// Drops expired positive entries (so they stop holding their team and buckets); returns
    /// how many.
    pub fn prune_expired(&self, now_ns: u64) -> usize {
        let mut dropped = 0;
        for s in &*self.shards {
            let mut shard = s.0.write().unwrap_or_else(PoisonError::into_inner);
            let expired: Vec<usize> = (0..shard.slots.len())
                .filter(|&i| {
                    let slot = &shard.slots[i];
                    slot.entry.is_some() && expired(now_ns, slot.expires_s)
                })
                .collect();
            let gone: Vec<_> = expired.into_iter().map(|i| shard.remove(i)).collect();
            drop(shard);
            dropped += gone.len();
        }
        dropped
    }

    /// Entry counts (positive, negative), after running the negative side's pending maintenance.
    /// Expired positive entries count until they are reclaimed.
    pub fn counts(&self) -> (u64, u64) {
        let positive = self
            .shards
            .iter()
            .map(|s| {
                s.0.read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .index
                    .len() as u64
            })
            .sum();
        self.negative.run_pending_tasks();
        (positive, self.negative.entry_count())
    }
}

#[cfg(test)]
mod tests;
