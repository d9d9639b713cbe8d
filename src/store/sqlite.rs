//! The embedded key store: one SQLite file in WAL mode.
//!
//! It holds teams, keys (digest, public id, visible prefix — never the key), heartbeats and
//! per-key usage. The gateway and the CLI may use the same file at once: WAL lets readers run
//! beside one writer, and a busy timeout makes a writer wait its turn instead of failing with
//! "database is locked". The schema is created and migrated here, by `PRAGMA user_version`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::{KeyStore, StateStore, StoreError, StoredKey, StoredTeam};
use crate::clock::UnixMillis;
use crate::config::LimitSpec;

/// Each entry migrates the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: heartbeats only (keygate 0.1 state files).
    "CREATE TABLE IF NOT EXISTS heartbeats (
         team_id TEXT PRIMARY KEY,
         last_ms INTEGER NOT NULL
     );",
    // 2: teams, keys and usage.
    "CREATE TABLE teams (
         id TEXT PRIMARY KEY,
         plan TEXT,
         limits TEXT NOT NULL DEFAULT '[]',
         heartbeat_required INTEGER,
         created_at INTEGER NOT NULL
     );
     CREATE TABLE keys (
         key_id TEXT PRIMARY KEY,
         digest BLOB NOT NULL UNIQUE,
         team_id TEXT NOT NULL,
         name TEXT NOT NULL DEFAULT '',
         environment TEXT,
         scopes TEXT NOT NULL DEFAULT '[]',
         visible_prefix TEXT NOT NULL DEFAULT '',
         created_at INTEGER NOT NULL,
         expires_at INTEGER,
         revoked_at INTEGER,
         last_used_at INTEGER,
         use_count INTEGER NOT NULL DEFAULT 0,
         replaced_by TEXT
     );
     CREATE INDEX keys_by_team ON keys (team_id);",
];

/// The SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// The key of a newly made key record, for [`SqliteStore::insert_key`].
#[derive(Debug)]
pub struct NewKey<'a> {
    pub key_id: &'a str,
    pub digest: &'a [u8; 32],
    pub team_id: &'a str,
    pub name: &'a str,
    pub environment: Option<&'a str>,
    pub scopes: &'a [String],
    pub visible_prefix: &'a str,
    pub created_at: UnixMillis,
    pub expires_at: Option<UnixMillis>,
}

/// A key record with its usage, as the admin API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub team_id: String,
    pub name: String,
    pub environment: Option<String>,
    pub scopes: Vec<String>,
    pub prefix: String,
    pub created_at: UnixMillis,
    pub expires_at: Option<UnixMillis>,
    pub revoked_at: Option<UnixMillis>,
    pub last_used_at: Option<UnixMillis>,
    pub use_count: u64,
    pub replaced_by: Option<String>,
}

fn json_list(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LimitJson {
    requests: u32,
    per_ms: u64,
    burst: u32,
}

fn limits_to_json(l: &[LimitSpec]) -> String {
    let v: Vec<LimitJson> = l
        .iter()
        .map(|s| LimitJson {
            requests: s.requests,
            per_ms: s.per.as_millis() as u64,
            burst: s.burst,
        })
        .collect();
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".into())
}

fn limits_from_json(s: &str) -> Vec<LimitSpec> {
    serde_json::from_str::<Vec<LimitJson>>(s)
        .unwrap_or_default()
        .into_iter()
        .map(|l| LimitSpec {
            requests: l.requests,
            per: Duration::from_millis(l.per_ms),
            burst: l.burst,
        })
        .collect()
}

const KEY_COLUMNS: &str =
    "key_id, team_id, name, environment, scopes, visible_prefix, created_at, \
                           expires_at, revoked_at, last_used_at, use_count, replaced_by";

fn key_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        key_id: r.get(0)?,
        team_id: r.get(1)?,
        name: r.get(2)?,
        environment: r.get(3)?,
        scopes: json_list(&r.get::<_, String>(4)?),
        prefix: r.get(5)?,
        created_at: r.get(6)?,
        expires_at: r.get(7)?,
        revoked_at: r.get(8)?,
        last_used_at: r.get(9)?,
        use_count: r.get::<_, i64>(10)? as u64,
        replaced_by: r.get(11)?,
    })
}

impl SqliteStore {
    /// Opens (creating and migrating) the store at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // WAL may be refused on a read-only directory; the store still works in the old mode.
        let _ = conn.pragma_update(None, "journal_mode", "WAL");
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SQLite's `data_version`: it changes when *another* connection commits to the file.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .pragma_query_value(None, "data_version", |r| r.get(0))?)
    }

    /// The schema version of the open file.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        Ok(self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize)
    }

    pub fn upsert_team(&self, t: &StoredTeam, now: UnixMillis) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO teams (id, plan, limits, heartbeat_required, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET plan = excluded.plan, limits = excluded.limits,
                 heartbeat_required = excluded.heartbeat_required",
            params![t.id, t.plan, limits_to_json(&t.limits), t.heartbeat_required, now],
        )?;
        Ok(())
    }

    pub fn list_teams(&self) -> Result<Vec<StoredTeam>, StoreError> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT id, plan, limits, heartbeat_required FROM teams ORDER BY id")?;
        let rows = st.query_map([], team_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Inserts a key, refusing it when the team already has `max_active` active keys. The count
    /// and the insert run in one immediate transaction, so two writers cannot both take the
    /// last place.
    pub fn insert_key(
        &self,
        k: &NewKey<'_>,
        max_active: usize,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let active: i64 = tx.query_row(
            "SELECT COUNT(*) FROM keys WHERE team_id = ?1 AND revoked_at IS NULL
                 AND (expires_at IS NULL OR expires_at > ?2)",
            params![k.team_id, now],
            |r| r.get(0),
        )?;
        if active as usize >= max_active {
            return Err(StoreError::Conflict(format!(
                "team {} already has {active} active keys (the limit is {max_active}); revoke one first",
                k.team_id
            )));
        }
        tx.execute(
            "INSERT INTO keys (key_id, digest, team_id, name, environment, scopes, visible_prefix, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                k.key_id,
                &k.digest[..],
                k.team_id,
                k.name,
                k.environment,
                serde_json::to_string(k.scopes).unwrap_or_else(|_| "[]".into()),
                k.visible_prefix,
                k.created_at,
                k.expires_at
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn get_key(&self, key_id: &str) -> Result<Option<KeyInfo>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE key_id = ?1"),
                [key_id],
                key_info,
            )
            .optional()?)
    }

    /// The digest of a key (to invalidate it in a running gateway's cache).
    pub fn key_digest(&self, key_id: &str) -> Result<Option<[u8; 32]>, StoreError> {
        let conn = self.conn();
        let v: Option<Vec<u8>> = conn
            .query_row("SELECT digest FROM keys WHERE key_id = ?1", [key_id], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(v.and_then(|v| v.try_into().ok()))
    }

    pub fn list_keys(&self, team_id: Option<&str>) -> Result<Vec<KeyInfo>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE (?1 IS NULL OR team_id = ?1) ORDER BY created_at, key_id"
        ))?;
        let rows = st.query_map([team_id], key_info)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes a key; returns false when it was already revoked.
    pub fn revoke_key(&self, key_id: &str, now: UnixMillis) -> Result<bool, StoreError> {
        let conn = self.conn();
        let exists: Option<Option<i64>> = conn
            .query_row(
                "SELECT revoked_at FROM keys WHERE key_id = ?1",
                [key_id],
                |r| r.get(0),
            )
            .optional()?;
        match exists {
            None => Err(StoreError::NotFound(format!("key {key_id}"))),
            Some(Some(_)) => Ok(false),
            Some(None) => {
                conn.execute(
                    "UPDATE keys SET revoked_at = ?2 WHERE key_id = ?1",
                    params![key_id, now],
                )?;
                Ok(true)
            }
        }
    }

    /// Ends an old key at `until` (a rotation's grace period) and records its successor.
    pub fn retire_key(
        &self,
        key_id: &str,
        until: UnixMillis,
        replaced_by: &str,
    ) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE keys SET expires_at = MIN(COALESCE(expires_at, ?2), ?2), replaced_by = ?3 WHERE key_id = ?1",
            params![key_id, until, replaced_by],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("key {key_id}")));
        }
        Ok(())
    }
}

fn team_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredTeam> {
    Ok(StoredTeam {
        id: r.get(0)?,
        plan: r.get(1)?,
        limits: limits_from_json(&r.get::<_, String>(2)?),
        heartbeat_required: r.get(3)?,
    })
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version as usize > MIGRATIONS.len() {
        return Err(StoreError::Invalid(format!(
            "the store has schema version {version}, newer than this keygate knows ({}); upgrade keygate",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

impl KeyStore for SqliteStore {
    fn find_key(&self, digest: &[u8; 32]) -> Result<Option<StoredKey>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT key_id, team_id, name, scopes, environment, created_at, expires_at, revoked_at, visible_prefix,
                    use_count
             FROM keys WHERE digest = ?1",
        )?;
        Ok(st
            .query_row([&digest[..]], |r| {
                Ok(StoredKey {
                    key_id: r.get(0)?,
                    team_id: r.get(1)?,
                    name: r.get(2)?,
                    scopes: json_list(&r.get::<_, String>(3)?),
                    environment: r.get(4)?,
                    created_at: r.get(5)?,
                    expires_at: r.get(6)?,
                    revoked_at: r.get(7)?,
                    visible_prefix: r.get(8)?,
                    use_count: r.get::<_, i64>(9)? as u64,
                })
            })
            .optional()?)
    }

    fn find_team(&self, id: &str) -> Result<Option<StoredTeam>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT id, plan, limits, heartbeat_required FROM teams WHERE id = ?1",
        )?;
        Ok(st.query_row([id], team_row).optional()?)
    }
}

impl StateStore for SqliteStore {
    fn load_heartbeats(&self) -> Result<Vec<(String, UnixMillis)>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT team_id, last_ms FROM heartbeats")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn save_heartbeats(&self, beats: &[(String, UnixMillis)]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO heartbeats (team_id, last_ms) VALUES (?1, ?2)
                 ON CONFLICT (team_id) DO UPDATE SET last_ms = MAX(last_ms, excluded.last_ms)",
            )?;
            for (team, at) in beats {
                st.execute(params![team, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn add_usage(&self, usage: &[(String, u64, UnixMillis)]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE keys SET use_count = use_count + ?2,
                     last_used_at = MAX(COALESCE(last_used_at, 0), ?3) WHERE key_id = ?1",
            )?;
            for (key_id, n, at) in usage {
                st.execute(params![key_id, *n as i64, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_round_trip_and_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        s.save_heartbeats(&[("a".into(), 10), ("b".into(), 20)])
            .unwrap();
        s.save_heartbeats(&[("a".into(), 5)]).unwrap();
        let mut got = s.load_heartbeats().unwrap();
        got.sort();
        assert_eq!(got, vec![("a".into(), 10), ("b".into(), 20)]);
    }

    #[test]
    fn a_store_from_an_older_version_opens_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute("INSERT INTO heartbeats VALUES ('t', 42)", [])
                .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
        assert_eq!(s.load_heartbeats().unwrap(), vec![("t".into(), 42)]);
        assert!(s.list_keys(None).unwrap().is_empty());
    }

    #[test]
    fn a_newer_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::Invalid(_))
        ));
    }
}
