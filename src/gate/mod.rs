//! The decision core: may this request pass, and as whom?
//!
//! [`Gate::check`] runs the checks of DESIGN.md in order, with no I/O and no `.await`:
//!
//! 1. **route** — method + path against the route table: 404, 405 with `Allow`, 400 for paths a
//!    server behind us could resolve to another route. Public routes stop here, granted.
//! 2. **credential** — the key from the configured sources: 401 *missing*; malformed (length,
//!    alphabet, ambiguity, bad checksum of an issued key): 401 *invalid* with no lookup.
//! 3. **key** — SHA-256 → cache. A known-unknown digest: 401 *invalid*. A miss returns
//!    [`Check::Lookup`]; the caller loads it off the async workers ([`Gate::load`]) and calls
//!    [`Gate::resume`]. Addresses over the failed-authentication budget get 429 before any
//!    lookup; only failures spend that budget.
//! 4. **policy** — revoked or expired: 401 *invalid*; environment or team parameter: 403 access
//!    denied; a missing scope: 403 insufficient scope.
//! 5. **heartbeat** — the team's last heartbeat older than the window: 403 plugin required.
//! 6. **limits** — the plan's buckets: 429 with `Retry-After`. Steps 1–5 consume no quota.
//!
//! State that must outlive a config snapshot (buckets, heartbeats, usage) lives in registries on
//! the [`Gate`]; the [`Snapshot`] is immutable and swapped whole on reload.

pub mod credential;
pub mod denial;
pub mod fields;
pub mod heartbeat;
pub mod keys;
pub mod limits;
pub mod route;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, Guard};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::Method;

pub use denial::{Denial, ErrorBodies, RateInfo};
pub use fields::Fields;
pub use keys::{Digest, KeyEntry, KeyView, TeamEntry};

use crate::clock::{Clock, Now, UnixMillis};
use crate::config::{Config, HeartbeatRule, LimitKey, TeamPlan};
use crate::metrics::{Metrics, Striped};
use crate::store::{KeyStore, StoreError, StoredKey, StoredTeam};
use credential::{CredentialRules, Found};
use heartbeat::Heartbeats;
use keys::{KeyCache, LoadError, Names, UsageRegistry};
use limits::{Buckets, LimitSet, LimiterRegistry};
use route::{Matched, Miss, RouteTable};

/// The parts of a request the gate looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub fields: Fields<'a>,
    pub peer: IpAddr,
}

/// A granted request.
#[derive(Debug, Clone)]
pub struct Grant {
    pub route: u16,
    /// `None` on public routes.
    pub key: Option<KeyView>,
    /// The rate-limit state, when the route is rate limited.
    pub rate: Option<RateInfo>,
    /// The whole entry, on the usage route only (its answer reads the limits, expiry, …).
    pub entry: Option<KeyEntry>,
}

/// The outcome of [`Gate::check`].
#[derive(Debug)]
pub enum Check {
    Granted(Grant),
    /// Refused. `key` is set when the refusal came after the key was known (for headers),
    /// `route` when a route had matched (for metrics).
    Denied {
        denial: Denial,
        key: Option<KeyView>,
        route: Option<u16>,
    },
    /// The key is not cached: load it ([`Gate::load`]) and [`Gate::resume`].
    Lookup(Digest),
}

impl Check {
    fn denied(denial: Denial, key: Option<KeyView>, route: Option<u16>) -> Check {
        Check::Denied { denial, key, route }
    }
}

/// What a request's outcome is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    /// Answered by keygate itself (the usage route).
    Served,
    Denied(Denial),
}

impl Outcome {
    const COUNT: usize = Denial::COUNT + 2;

    fn index(self) -> usize {
        match self {
            Outcome::Forwarded => 0,
            Outcome::Served => 1,
            Outcome::Denied(d) => 2 + d.index(),
        }
    }

    fn label(i: usize) -> &'static str {
        match i {
            0 => "forwarded",
            1 => "served",
            _ => Denial::codes().nth(i - 2).unwrap_or("unknown"),
        }
    }
}

/// A declared (config) key.
#[derive(Debug)]
struct DeclaredKey {
    stored: StoredKey,
}

/// One immutable, validated config with everything derived from it.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    pub credentials: CredentialRules,
    pub errors: ErrorBodies,
    pub heartbeat_window_ms: i64,
    teams: HashMap<String, Arc<TeamEntry>>,
    declared: HashMap<Digest, DeclaredKey>,
    plans: HashMap<String, Arc<LimitSet>>,
    /// Request counters per route (the last row: no route) and outcome.
    counters: Vec<Vec<Arc<Striped>>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("routes", &self.routes.len())
            .field("teams", &self.teams.len())
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Counts a request's outcome.
    #[inline]
    pub fn count(&self, route: Option<u16>, outcome: Outcome) {
        let row = route.map(usize::from).unwrap_or(self.counters.len() - 1);
        self.counters[row][outcome.index()].inc();
    }

    /// A team declared in the config.
    pub fn team(&self, id: &str) -> Option<&Arc<TeamEntry>> {
        self.teams.get(id)
    }
}

/// The per-address failed-authentication budget: failures take tokens; an address out of tokens
/// is blocked (no store lookups, 429) until its next token is due. Successes cost nothing, so
/// valid keys behind a shared address are never refused for others' failures.
struct FailedAuth {
    budget: RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, Clock, NoOpMiddleware<Nanos>>,
    /// Blocked addresses → monotonic nanoseconds when they may try again.
    blocked: moka::sync::Cache<IpAddr, u64, ahash::RandomState>,
}

/// Whole seconds, rounded up, and at least one.
fn ceil_secs(d: std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Teams resolved since the last reload or `invalidate_all` (`epoch`): one entry per team,
/// shared by all its cached keys, whose team's bucket list it carries when limits are keyed by
/// team.
#[derive(Default)]
struct Teams {
    epoch: u64,
    by_id: hashbrown::HashTable<Arc<TeamEntry>>,
    hasher: ahash::RandomState,
}

impl Teams {
    fn get(&self, id: &str) -> Option<&Arc<TeamEntry>> {
        self.by_id.find(self.hasher.hash_one(id), |t| &*t.id == id)
    }
}

/// The gate: the current snapshot plus the state that outlives snapshots.
pub struct Gate {
    snapshot: ArcSwap<Snapshot>,
    cache: KeyCache,
    teams: Mutex<Teams>,
    /// Moved by reload and `invalidate_all`: team resolutions made before do not apply.
    epoch: AtomicU64,
    store: Arc<dyn KeyStore>,
    pub limiters: LimiterRegistry,
    pub heartbeats: Heartbeats,
    pub usage: UsageRegistry,
    names: Names,
    failed_auth: Option<FailedAuth>,
    clock: Clock,
    metrics: Metrics,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// Builds a gate for a validated config.
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn KeyStore>,
        clock: Clock,
        metrics: Metrics,
    ) -> Gate {
        let limiters = LimiterRegistry::new(clock.clone());
        let heartbeats = Heartbeats::default();
        let failed_auth =
            NonZeroU32::new(config.limits.failed_auth_per_minute).map(|n| FailedAuth {
                budget: RateLimiter::new(
                    Quota::per_minute(n),
                    DefaultKeyedStateStore::default(),
                    clock.clone(),
                ),
                blocked: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(std::time::Duration::from_secs(3600))
                    .build_with_hasher(ahash::RandomState::new()),
            });
        let cache = KeyCache::new(&config.cache);
        let names = Names::default();
        let snap = build_snapshot(
            config,
            Registries {
                limiters: &limiters,
                heartbeats: &heartbeats,
                names: &names,
            },
            &metrics,
        );
        Gate {
            snapshot: ArcSwap::from_pointee(snap),
            cache,
            teams: Mutex::new(Teams::default()),
            epoch: AtomicU64::new(0),
            store,
            limiters,
            heartbeats,
            usage: UsageRegistry::default(),
            names,
            failed_auth,
            clock,
            metrics,
        }
    }

    /// The current snapshot.
    #[inline]
    pub fn snapshot(&self) -> Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Swaps in a new validated config. Buckets of unchanged quotas, heartbeats and usage are
    /// kept; cached keys are dropped so they are re-resolved against the new plans and teams.
    pub fn reload(&self, config: Arc<Config>) {
        let snap = build_snapshot(config, self.registries(), &self.metrics);
        self.snapshot.store(Arc::new(snap));
        self.invalidate_all();
    }

    /// Forgets a cached key at once (revocation).
    pub fn invalidate(&self, d: &Digest) {
        self.cache.invalidate(d);
    }

    /// Forgets every cached key and resolved team (a team's plan changed, keys rotated in bulk).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let gone = std::mem::take(
            &mut self
                .teams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .by_id,
        );
        drop(gone);
        self.cache.invalidate_all();
    }

    /// Drops expired cache entries, teams no cached key refers to any more, idle rate-limit
    /// buckets and failed-authentication records; returns buckets kept.
    pub fn prune(&self) -> usize {
        if let Some(f) = &self.failed_auth {
            f.budget.retain_recent();
            f.budget.shrink_to_fit();
        }
        self.cache
            .prune_expired(self.clock.monotonic().as_nanos() as u64);
        let snap = self.snapshot.load();
        let mut teams = self.teams.lock().unwrap_or_else(PoisonError::into_inner);
        teams.by_id.retain(|team| {
            // Held by the table, and by the snapshot for a declared team; more is a key.
            let declared = snap
                .teams
                .get(&*team.id)
                .is_some_and(|t| Arc::ptr_eq(t, team));
            Arc::strong_count(team) > 1 + usize::from(declared)
        });
        let Teams { by_id, hasher, .. } = &mut *teams;
        by_id.shrink_to_fit(|t| hasher.hash_one(&*t.id));
        drop(teams);
        self.limiters.prune()
    }

    /// Teams resolved and shared by cached keys.
    pub fn teams_held(&self) -> usize {
        self.teams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .len()
    }

    /// Positive and negative cache entry counts.
    pub fn cache_counts(&self) -> (u64, u64) {
        self.cache.counts()
    }

    /// Steps 1–6 on a request; no I/O. See the module docs for the order.
    #[inline]
    pub fn check(&self, snap: &Snapshot, head: &RequestHead<'_>, now: Now) -> Check {
        self.run(snap, head, now, None)
    }

    /// Finishes a check after [`Gate::load`].
    pub fn resume(
        &self,
        snap: &Snapshot,
        head: &RequestHead<'_>,
        now: Now,
        loaded: Result<KeyEntry, LoadError>,
    ) -> Check {
        self.run(snap, head, now, Some(loaded))
    }

    fn run(
        &self,
        snap: &Snapshot,
        head: &RequestHead<'_>,
        now: Now,
        loaded: Option<Result<KeyEntry, LoadError>>,
    ) -> Check {
        let matched = match snap.routes.find(head.method, head.path) {
            Ok(m) => m,
            Err(Miss::NotFound) => return Check::denied(Denial::NotFound, None, None),
            Err(Miss::BadPath) => return Check::denied(Denial::BadRequest, None, None),
            Err(Miss::MethodNotAllowed { group }) => {
                return Check::denied(Denial::MethodNotAllowed { group }, None, None)
            }
        };
        let route = &snap.routes.get(matched.index).config;
        if route.public {
            return Check::Granted(Grant {
                route: matched.index,
                key: None,
                rate: None,
                entry: None,
            });
        }
        let presented = match snap.credentials.find(head.fields) {
            Found::Key(p) => p,
            Found::Missing => return Check::denied(Denial::MissingKey, None, Some(matched.index)),
            Found::Invalid => return self.failed_auth(head.peer, matched.index),
        };
        let decide = |entry: &KeyEntry| self.decide(snap, head, now, &matched, entry);
        match loaded {
            Some(Ok(e)) => decide(&e),
            Some(Err(LoadError::Unknown)) => self.failed_auth(head.peer, matched.index),
            Some(Err(LoadError::Store(_))) => {
                Check::denied(Denial::StoreUnavailable, None, Some(matched.index))
            }
            None => {
                let d = keys::digest(presented.bytes);
                // Decided in place: the entry is not cloned out of its slot.
                if let Some(c) = self.cache.with_hit(&d, now.mono_ns, decide) {
                    self.metrics.cache_hit.inc();
                    return c;
                }
                // A blocked address is refused whatever the negative cache says: asked first,
                // it saves a flood from that address one cache lookup per request.
                if let Some(d) = self.admit_uncached(head.peer, now.mono_ns) {
                    return Check::denied(d, None, Some(matched.index));
                }
                if self.cache.known_unknown(&d) {
                    self.metrics.cache_negative_hit.inc();
                    return self.failed_auth(head.peer, matched.index);
                }
                self.metrics.cache_miss.inc();
                Check::Lookup(d)
            }
        }
    }

    /// Steps 4 to 6 for a known key: policy, heartbeat, limits; and its use counted if granted.
    /// Runs under the key cache's read lock on a hit, so nothing here may block.
    #[inline]
    fn decide(
        &self,
        snap: &Snapshot,
        head: &RequestHead<'_>,
        now: Now,
        matched: &Matched<'_>,
        entry: &KeyEntry,
    ) -> Check {
        let index = matched.index;
        let route = &snap.routes.get(index).config;
        let refuse = |d: Denial| Check::denied(d, Some(entry.view()), Some(index));
        // 4. policy
        if entry.is_dead(now.wall_ms) {
            return self.failed_auth(head.peer, index);
        }
        if !route.environments.is_empty()
            && !entry
                .environment()
                .is_some_and(|e| route.environments.iter().any(|r| r == e))
        {
            return refuse(Denial::AccessDenied);
        }
        if route.team_param.is_some() && matched.team_param != Some(&*entry.team.id) {
            return refuse(Denial::AccessDenied);
        }
        if !entry.has_scopes(&route.scopes) {
            return refuse(Denial::InsufficientScope);
        }
        // 5. heartbeat
        if route.heartbeat == HeartbeatRule::Required
            && entry.team.heartbeat_required
            && !entry.team.beat.fresh(now.wall_ms, snap.heartbeat_window_ms)
        {
            return refuse(Denial::PluginRequired);
        }
        // 6. limits
        let rate = if route.rate_limited {
            match limits::check(entry.buckets(), now.mono_ns) {
                Ok(info) => info,
                Err(info) => return refuse(Denial::RateLimited(info)),
            }
        } else {
            None
        };
        if route.heartbeat == HeartbeatRule::Record {
            self.heartbeats.record(entry.team.beat, now.wall_ms);
        }
        entry.usage.hit(now.wall_ms);
        Check::Granted(Grant {
            route: index,
            key: Some(entry.view()),
            rate,
            entry: route.usage.then(|| entry.clone()),
        })
    }

    /// An *invalid key* answer, charged to the client address's failed-authentication budget.
    #[cold]
    #[inline(never)]
    fn failed_auth(&self, peer: IpAddr, route: u16) -> Check {
        if let Some(f) = &self.failed_auth {
            if let Err(not_until) = f.budget.check_key(&peer) {
                let now = governor::clock::Clock::now(&self.clock);
                let until = now.as_u64() + not_until.wait_time_from(now).as_nanos() as u64;
                f.blocked.insert(peer, until);
            }
        }
        Check::denied(Denial::InvalidKey, None, Some(route))
    }

    /// Refuses a key that is not in the positive cache when its address is blocked, before any
    /// lookup. Keys already cached are never refused here.
    #[cold]
    #[inline(never)]
    fn admit_uncached(&self, peer: IpAddr, now: u64) -> Option<Denial> {
        let f = self.failed_auth.as_ref()?;
        let until = f.blocked.get(&peer)?;
        if until <= now {
            f.blocked.invalidate(&peer);
            return None;
        }
        Some(Denial::TooManyFailedAuth {
            retry_after_secs: ceil_secs(std::time::Duration::from_nanos(until - now)),
        })
    }

    /// Whether [`Gate::load`] never blocks (the config's keys are the only store), so a miss can
    /// be loaded on the async worker instead of the blocking pool.
    pub fn loads_inline(&self) -> bool {
        self.store.is_in_memory()
    }

    /// Resolves a digest through the cache and the store (blocking; one load per digest).
    pub fn load(&self, d: &Digest) -> Result<KeyEntry, LoadError> {
        let now_ns = self.clock.monotonic().as_nanos() as u64;
        self.cache.load(d, now_ns, || {
            // Read before the snapshot: a reload after this point makes the team not memoized.
            let epoch = self.epoch.load(Ordering::SeqCst);
            let snap = self.snapshot.load();
            if let Some(k) = snap.declared.get(d) {
                return self.entry(&snap, &k.stored, epoch);
            }
            self.metrics.store_lookups.inc();
            let stored = self
                .store
                .find_key(d)
                .map_err(|e| self.store_error(e))?
                .ok_or(LoadError::Unknown)?;
            self.entry(&snap, &stored, epoch)
        })
    }

    fn store_error(&self, e: StoreError) -> LoadError {
        self.metrics.store_errors.inc();
        tracing::warn!(error = %e, "key store lookup failed; failing closed");
        LoadError::Store(e.to_string())
    }

    /// Builds the cache entry of a stored key against the current snapshot.
    fn entry(&self, snap: &Snapshot, k: &StoredKey, epoch: u64) -> Result<KeyEntry, LoadError> {
        let team = self.team(snap, &k.team_id, epoch)?;
        // Refuses ids that cannot be a header value before anything is kept for them.
        let usage = self
            .usage
            .get(&k.key_id, k.use_count)
            .ok_or(LoadError::Unknown)?;
        let buckets = match snap.config.limits.key_by {
            LimitKey::Team => Buckets::None,
            LimitKey::Key => self.limiters.buckets(&team.limits, usage.key_id()),
        };
        Ok(KeyEntry::new(
            team,
            buckets,
            usage,
            &k.scopes,
            k.environment.as_deref(),
            k.expires_at,
            k.revoked_at.is_some(),
        ))
    }

    /// A key's team, resolved once and shared by all its cached keys: from the snapshot if
    /// declared, else from the store.
    fn team(&self, snap: &Snapshot, id: &str, epoch: u64) -> Result<Arc<TeamEntry>, LoadError> {
        if let Some(t) = snap.teams.get(id) {
            return Ok(t.clone());
        }
        {
            let mut teams = self.teams.lock().unwrap_or_else(PoisonError::into_inner);
            if teams.epoch < epoch {
                // Resolved under another config or before a team changed: not reusable.
                teams.epoch = epoch;
                teams.by_id.clear();
            }
            if teams.epoch == epoch {
                if let Some(t) = teams.get(id) {
                    return Ok(t.clone());
                }
            }
        }
        let stored = self
            .store
            .find_team(id)
            .map_err(|e| self.store_error(e))?
            .ok_or(LoadError::Unknown)?;
        let team = self.team_entry(snap, &stored).ok_or(LoadError::Unknown)?;
        let mut teams = self.teams.lock().unwrap_or_else(PoisonError::into_inner);
        if teams.epoch != epoch || self.epoch.load(Ordering::SeqCst) != epoch {
            return Ok(team);
        }
        // A key of the same team may have been loaded meanwhile: its entry wins.
        if let Some(t) = teams.get(id) {
            return Ok(t.clone());
        }
        let Teams { by_id, hasher, .. } = &mut *teams;
        by_id.insert_unique(hasher.hash_one(&*team.id), team.clone(), |t| {
            hasher.hash_one(&*t.id)
        });
        Ok(team)
    }

    fn registries(&self) -> Registries<'_> {
        Registries {
            limiters: &self.limiters,
            heartbeats: &self.heartbeats,
            names: &self.names,
        }
    }

    /// A team from the store, resolved against the snapshot's plans.
    pub fn team_entry(&self, snap: &Snapshot, t: &StoredTeam) -> Option<Arc<TeamEntry>> {
        let limits = match &t.plan {
            Some(p) => snap.plans.get(p)?.clone(),
            None => self
                .limiters
                .set(&self.names, &format!("{}-custom", t.id), &t.limits),
        };
        let required = t
            .heartbeat_required
            .unwrap_or(snap.config.heartbeat.required);
        make_team(
            &t.id,
            t.plan.is_some(),
            limits,
            required,
            snap.config.limits.key_by,
            self.registries(),
        )
    }

    /// Seconds of heartbeat age for a team, if it has one.
    pub fn heartbeat_age(&self, team: &str, now: UnixMillis) -> Option<i64> {
        self.heartbeats.last(team).map(|t| (now - t).max(0) / 1000)
    }
}

/// A team on a named plan (`limits` is the plan's, named after it) or on limits of its own
/// (plan "custom").
fn make_team(
    id: &str,
    named_plan: bool,
    limits: Arc<LimitSet>,
    required: bool,
    key_by: LimitKey,
    r: Registries<'_>,
) -> Option<Arc<TeamEntry>> {
    let (id, team_header) = r.names.get(id)?;
    let (plan, plan_header) = r
        .names
        .get(if named_plan { &limits.name } else { "custom" })?;
    Some(Arc::new(TeamEntry {
        team_header,
        plan_header,
        buckets: match key_by {
            LimitKey::Team => r.limiters.buckets(&limits, id.as_str()),
            LimitKey::Key => Buckets::None,
        },
        plan,
        beat: r.heartbeats.beat(&id, required),
        id,
        heartbeat_required: required,
        limits,
    }))
}

/// The registries a team entry draws from.
#[derive(Clone, Copy)]
struct Registries<'a> {
    limiters: &'a LimiterRegistry,
    heartbeats: &'a Heartbeats,
    names: &'a Names,
}

fn build_snapshot(config: Arc<Config>, r: Registries<'_>, metrics: &Metrics) -> Snapshot {
    let limiters = r.limiters;
    let plans: HashMap<String, Arc<LimitSet>> = config
        .plans
        .iter()
        .map(|(name, specs)| (name.clone(), limiters.set(r.names, name, specs)))
        .collect();
    let mut teams = HashMap::new();
    let mut declared = HashMap::new();
    for t in &config.teams {
        let (named, limits) = match &t.plan {
            TeamPlan::Named(p) => match plans.get(p) {
                Some(l) => (true, l.clone()),
                None => continue, // refused by validation
            },
            TeamPlan::Custom(specs) => (
                false,
                limiters.set(r.names, &format!("{}-custom", t.id), specs),
            ),
        };
        let required = t.heartbeat_required.unwrap_or(config.heartbeat.required);
        let Some(team) = make_team(&t.id, named, limits, required, config.limits.key_by, r) else {
            continue;
        };
        teams.insert(t.id.clone(), team);
        for k in &t.keys {
            declared.insert(
                k.digest,
                DeclaredKey {
                    stored: StoredKey {
                        key_id: k.id.clone(),
                        team_id: t.id.clone(),
                        name: k.id.clone(),
                        scopes: k.scopes.clone(),
                        environment: k.environment.clone(),
                        created_at: 0,
                        expires_at: None,
                        revoked_at: None,
                        visible_prefix: String::new(),
                        use_count: 0,
                    },
                },
            );
        }
    }
    let routes = RouteTable::new(&config.routes);
    let counters = routes
        .routes()
        .map(|r| r.config.name.as_str())
        .chain(std::iter::once("none"))
        .map(|name| {
            (0..Outcome::COUNT)
                .map(|i| {
                    metrics.striped(
                        metrics
                            .requests
                            .with_label_values(&[name, Outcome::label(i)]),
                    )
                })
                .collect()
        })
        .collect();
    Snapshot {
        credentials: CredentialRules::new(&config.credentials, &config.keys.prefixes),
        errors: ErrorBodies::new(&config.errors),
        heartbeat_window_ms: config.heartbeat.window.as_millis() as i64,
        routes,
        teams,
        declared,
        plans,
        counters,
        config,
    }
}
