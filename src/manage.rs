//! Key and team management: the operations behind the admin API and the `keys`/`teams` CLI.
//!
//! Both front ends call these functions on the same [`SqliteStore`], so a key created, revoked
//! or rotated by either behaves the same. Keys are made here and returned exactly once; only
//! their digest, public id and visible prefix are stored.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::clock::UnixMillis;
use crate::config::{valid_id, Config, LimitSpec};
use crate::gate::credential;
use crate::gate::keys::digest;
use crate::store::sqlite::{KeyInfo, NewKey, SqliteStore};
use crate::store::{StoreError, StoredTeam};

/// Why a management operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ManageError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ManageError::NotFound(what),
            StoreError::Conflict(m) => ManageError::Conflict(m),
            StoreError::Invalid(m) => ManageError::Invalid(m),
            other => ManageError::Store(other),
        }
    }
}

/// What a new key should be.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    pub team: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// An environment named in `keys.prefixes` (`live`, `test`); default `live`.
    #[serde(default)]
    pub environment: Option<String>,
    /// Lifetime from now, e.g. `"90d"`; none by default (keys do not expire).
    #[serde(default, with = "humantime_serde")]
    pub expires_in: Option<Duration>,
}

/// A key just made: the only time its plaintext exists outside the client.
#[derive(Debug, serde::Serialize)]
pub struct IssuedKey {
    pub key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

/// A team as the admin API and CLI take it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamRequest {
    /// Required on create; on `PUT /admin/teams/{id}` the path's id is used.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub limits: Vec<LimitRequest>,
    #[serde(default)]
    pub heartbeat_required: Option<bool>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRequest {
    pub requests: u32,
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    #[serde(default)]
    pub burst: Option<u32>,
}

/// A team as listed.
#[derive(Debug, serde::Serialize)]
pub struct TeamInfo {
    pub id: String,
    pub plan: String,
    pub limits: Vec<BTreeMap<&'static str, serde_json::Value>>,
    pub heartbeat_required: Option<bool>,
    /// `config` (declared in the TOML file) or `store`.
    pub source: &'static str,
}

fn team_known(config: &Config, store: &SqliteStore, team: &str) -> Result<bool, ManageError> {
    Ok(config.teams.iter().any(|t| t.id == team)
        || crate::store::KeyStore::find_team(store, team)?.is_some())
}

fn random_id() -> String {
    // 12 base62 characters of the same OS randomness as keys, but not a key: safe to show.
    let k = credential::issue("");
    k[..12].to_owned()
}

/// Makes a key for a team and stores its digest; returns the key (shown once).
pub fn create_key(
    config: &Config,
    store: &SqliteStore,
    req: &KeyRequest,
    now: UnixMillis,
) -> Result<IssuedKey, ManageError> {
    if !team_known(config, store, &req.team)? {
        return Err(ManageError::NotFound(format!(
            "team {:?} (create it first: keygate teams create, or POST /admin/teams)",
            req.team
        )));
    }
    let env = req.environment.clone().unwrap_or_else(|| "live".to_owned());
    let Some(prefix) = config.keys.prefixes.get(&env) else {
        return Err(ManageError::Invalid(format!(
            "unknown environment {env:?}; configured: {}",
            config
                .keys
                .prefixes
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    for s in &req.scopes {
        if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ManageError::Invalid(format!(
                "scope {s:?} must be 1–64 printable characters"
            )));
        }
    }
    let name = req.name.clone().unwrap_or_default();
    if name.len() > 128 {
        return Err(ManageError::Invalid(
            "name is at most 128 characters".into(),
        ));
    }
    let key = credential::issue(prefix);
    let key_id = format!("key_{}", random_id());
    let visible_prefix = format!("{}{}", prefix, &key[prefix.len()..prefix.len() + 4]);
    let expires_at = req.expires_in.map(|d| now + d.as_millis() as i64);
    store.insert_key(
        &NewKey {
            key_id: &key_id,
            digest: &digest(key.as_bytes()),
            team_id: &req.team,
            name: &name,
            environment: Some(&env),
            scopes: &req.scopes,
            visible_prefix: &visible_prefix,
            created_at: now,
            expires_at,
        },
        config.keys.max_active_per_team,
        now,
    )?;
    let info = store
        .get_key(&key_id)?
        .ok_or_else(|| ManageError::NotFound(format!("key {key_id}")))?;
    Ok(IssuedKey { key, info })
}

/// Revokes a key; returns its digest so a running gateway can forget it at once.
pub fn revoke_key(
    store: &SqliteStore,
    key_id: &str,
    now: UnixMillis,
) -> Result<[u8; 32], ManageError> {
    let d = store
        .key_digest(key_id)?
        .ok_or_else(|| ManageError::NotFound(format!("key {key_id}")))?;
    store.revoke_key(key_id, now)?;
    Ok(d)
}

/// A new key for the same team, name, scopes and environment; the old one keeps working for
/// `grace` (none: it stops now), then stops by itself. Returns the new key and the old digest.
pub fn rotate_key(
    config: &Config,
    store: &SqliteStore,
    key_id: &str,
    grace: Duration,
    now: UnixMillis,
) -> Result<(IssuedKey, [u8; 32]), ManageError> {
    let old = store
        .get_key(key_id)?
        .ok_or_else(|| ManageError::NotFound(format!("key {key_id}")))?;
    if old.revoked_at.is_some() || old.expires_at.is_some_and(|e| e <= now) {
        return Err(ManageError::Conflict(format!(
            "key {key_id} is no longer active; create a new one instead"
        )));
    }
    let old_digest = store
        .key_digest(key_id)?
        .ok_or_else(|| ManageError::NotFound(format!("key {key_id}")))?;
    // The new key is made before the old one retires: a failed create (the team at its key
    // limit) leaves the old key untouched rather than the team without a key.
    let remaining = old
        .expires_at
        .map(|e| Duration::from_millis((e - now).max(0) as u64));
    let issued = create_key(
        config,
        store,
        &KeyRequest {
            team: old.team_id,
            name: Some(old.name),
            scopes: old.scopes,
            environment: old.environment,
            expires_in: remaining,
        },
        now,
    )?;
    store.retire_key(key_id, now + grace.as_millis() as i64, &issued.info.key_id)?;
    Ok((issued, old_digest))
}

/// Creates or updates a team (a plan name from the config, or custom limits).
pub fn upsert_team(
    config: &Config,
    store: &SqliteStore,
    req: &TeamRequest,
    now: UnixMillis,
) -> Result<(), ManageError> {
    if !valid_id(&req.id) {
        return Err(ManageError::Invalid(
            "a team id is 1–64 ASCII letters, digits, '-', '_' or '.'".into(),
        ));
    }
    if config.teams.iter().any(|t| t.id == req.id) {
        return Err(ManageError::Conflict(format!(
            "team {:?} is declared in the config file; change it there",
            req.id
        )));
    }
    let limits: Vec<LimitSpec> = req
        .limits
        .iter()
        .map(|l| LimitSpec {
            requests: l.requests,
            per: l.per,
            burst: l.burst.unwrap_or(l.requests),
        })
        .collect();
    match (&req.plan, limits.is_empty()) {
        (Some(p), true) if config.plans.contains_key(p) => {}
        (Some(p), true) => {
            return Err(ManageError::Invalid(format!(
                "no plan named {p:?}; configured: {}",
                config.plans.keys().cloned().collect::<Vec<_>>().join(", ")
            )))
        }
        (None, false) => {
            if limits
                .iter()
                .any(|l| l.requests == 0 || l.per.is_zero() || l.burst == 0)
            {
                return Err(ManageError::Invalid(
                    "each limit needs requests ≥ 1, per > 0 and burst ≥ 1".into(),
                ));
            }
        }
        _ => {
            return Err(ManageError::Invalid(
                "give exactly one of `plan` or `limits`".into(),
            ))
        }
    }
    store.upsert_team(
        &StoredTeam {
            id: req.id.clone(),
            plan: req.plan.clone(),
            limits,
            heartbeat_required: req.heartbeat_required,
        },
        now,
    )?;
    Ok(())
}

fn limits_json(l: &[LimitSpec]) -> Vec<BTreeMap<&'static str, serde_json::Value>> {
    l.iter()
        .map(|s| {
            BTreeMap::from([
                ("requests", s.requests.into()),
                ("per_seconds", s.per.as_secs_f64().into()),
                ("burst", s.burst.into()),
            ])
        })
        .collect()
}

/// Every team: the config's and the store's.
pub fn list_teams(config: &Config, store: &SqliteStore) -> Result<Vec<TeamInfo>, ManageError> {
    let mut out: Vec<TeamInfo> = config
        .teams
        .iter()
        .map(|t| {
            let (plan, limits) = match &t.plan {
                crate::config::TeamPlan::Named(p) => {
                    (p.clone(), config.plans.get(p).cloned().unwrap_or_default())
                }
                crate::config::TeamPlan::Custom(l) => ("custom".to_owned(), l.clone()),
            };
            TeamInfo {
                id: t.id.clone(),
                plan,
                limits: limits_json(&limits),
                heartbeat_required: t.heartbeat_required,
                source: "config",
            }
        })
        .collect();
    for t in store.list_teams()? {
        let limits = match &t.plan {
            Some(p) => config.plans.get(p).cloned().unwrap_or_default(),
            None => t.limits.clone(),
        };
        out.push(TeamInfo {
            plan: t.plan.clone().unwrap_or_else(|| "custom".to_owned()),
            limits: limits_json(&limits),
            heartbeat_required: t.heartbeat_required,
            id: t.id,
            source: "store",
        });
    }
    Ok(out)
}
