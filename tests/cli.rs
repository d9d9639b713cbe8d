//! The real binary's `keys` and `teams` commands against a store in a temp dir, alone and beside
//! a running gateway on the same store (told through its admin API, or noticing by itself).

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keygate::clock::Clock;
use keygate::config::Config;
use serde_json::Value;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_keygate");
const TOKEN: &str = "kg-cli-admin-4e8b0d";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// The last line of standard output (where `keys create` and `keys rotate` print the key).
    fn last_line(&self) -> &str {
        self.stdout.lines().last().unwrap_or("")
    }

    /// Standard output but the last line, as JSON (the key's record).
    fn record(&self) -> Value {
        let lines: Vec<&str> = self.stdout.lines().collect();
        let json = lines[..lines.len().saturating_sub(1)].join("\n");
        serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("record is not JSON ({e}):\n{}", self.stdout))
    }

    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `keygate <args> --config <config>` to completion.
async fn cli(config: &Path, args: &[&str]) -> Out {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run keygate");
    Out {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// `keys create`: (key, key id).
async fn create_key(config: &Path, team: &str) -> (String, String) {
    let out = cli(config, &["keys", "create", "--team", team]).await;
    out.ok();
    let key = out.last_line().to_owned();
    assert!(
        is_live_key(&key),
        "last line is not a key: {:?}",
        out.stdout
    );
    let id = out.record()["key_id"].as_str().unwrap().to_owned();
    (key, id)
}

/// A config file in `dir` with a store in `dir/state`; `admin` is the admin table's listen
/// address and token file.
fn write_config(
    dir: &Path,
    upstream: impl std::fmt::Display,
    admin: Option<(&str, &Path)>,
    extra: &str,
) -> PathBuf {
    let mut cfg = Cfg::new(upstream);
    cfg.state_dir = Some(dir.join("state"));
    cfg.extra.push_str(extra);
    let toml = match admin {
        Some((listen, token)) => with_admin(&cfg.render(), listen, Some(token)),
        None => cfg.render(),
    };
    let path = dir.join("keygate.toml");
    write_file(&path, &toml);
    path
}

/// A gateway on the store of `config`, whose admin listener is on the address the file names
/// (bound here, so the CLI reading the file reaches it), with the system clock the CLI uses.
async fn gateway_for(config: &Path) -> Keygate {
    let c = Config::load(config).unwrap();
    let admin = tokio::net::TcpListener::bind(c.admin.listen).await.unwrap();
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Keygate::start_on(c, Clock::system(), proxy, admin).await
}

/// An admin address for a config file: a port that was free a moment ago.
fn admin_listen() -> String {
    closed_port().to_string()
}

// ---------------------------------------------------------------------------------------------
// 9

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_and_keys_are_made_and_listed_and_refusals_have_their_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), closed_port(), None, "");

    let out = cli(&config, &["teams", "create", "acme", "--plan", "pro"]).await;
    out.ok();
    assert!(out.stdout.contains("acme"), "{}", out.stdout);
    let out = cli(
        &config,
        &[
            "teams",
            "create",
            "bigco",
            "--limit",
            "20000/1h",
            "--limit",
            "600/1m:100",
        ],
    )
    .await;
    out.ok();

    let out = cli(
        &config,
        &[
            "keys",
            "create",
            "--team",
            "acme",
            "--name",
            "ci",
            "--scopes",
            "read,write",
        ],
    )
    .await;
    out.ok();
    let key = out.last_line().to_owned();
    assert!(is_live_key(&key), "last line {key:?} of:\n{}", out.stdout);
    let record = out.record();
    let id = record["key_id"].as_str().unwrap().to_owned();
    assert_eq!(record["team_id"], "acme");
    assert_eq!(record["name"], "ci");
    assert_eq!(record["scopes"], serde_json::json!(["read", "write"]));
    assert_eq!(record["prefix"], &key[..12]);
    assert_eq!(
        out.stdout.matches(&key[8..]).count(),
        1,
        "the key is printed once, on its own line"
    );
    let (key2, id2) = create_key(&config, "acme").await;
    assert_ne!(key, key2);

    let out = cli(&config, &["keys", "list", "--team", "acme"]).await;
    out.ok();
    let listed: Value = serde_json::from_str(&out.stdout).expect("JSON list");
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&id.as_str()) && ids.contains(&id2.as_str()));
    for k in [&key, &key2] {
        for secret in [k.as_str(), &k[8..], &sha256_hex(k)] {
            assert!(!out.stdout.contains(secret), "keys list leaks {secret}");
        }
    }
    let out = cli(&config, &["keys", "list", "--team", "bigco"]).await;
    out.ok();
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );

    let out = cli(&config, &["teams", "list"]).await;
    out.ok();
    let teams: Value = serde_json::from_str(&out.stdout).unwrap();
    let find = |id: &str| {
        teams
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {teams}"))
            .clone()
    };
    assert_eq!(find("acme")["plan"], "pro");
    assert_eq!(find("acme")["source"], "store");
    assert_eq!(find("bigco")["plan"], "custom");
    assert_eq!(find("bigco")["limits"].as_array().unwrap().len(), 2);
    assert_eq!(find("alpha")["source"], "config");

    // Refused: an unknown team (65), naming it; nothing is stored.
    let out = cli(&config, &["keys", "create", "--team", "nope"]).await;
    assert_eq!(out.code, 65, "stderr: {}", out.stderr);
    assert!(out.stderr.contains("nope"), "{}", out.stderr);
    assert!(!out.stdout.contains("sk_live_"), "{}", out.stdout);
    let out = cli(&config, &["keys", "list"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Unknown key: 65.
    let out = cli(&config, &["keys", "revoke", "key_nope"]).await;
    assert_eq!(out.code, 65, "stderr: {}", out.stderr);

    // A bad config (64): not TOML, invalid, missing, or without a store.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[proxy\nlisten = ").unwrap();
    let invalid = dir.path().join("invalid.toml");
    std::fs::write(
        &invalid,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("plan = \"free\"", "plan = \"nonexistent\""),
    )
    .unwrap();
    let no_store = dir.path().join("no-store.toml");
    std::fs::write(&no_store, base_toml(closed_port())).unwrap();
    let missing = dir.path().join("missing.toml");
    for (path, args) in [
        (&bad, &["keys", "create", "--team", "acme"][..]),
        (&invalid, &["keys", "list"][..]),
        (&missing, &["teams", "list"][..]),
        (&no_store, &["keys", "list"][..]),
    ] {
        let out = cli(path, args).await;
        assert_eq!(
            out.code,
            64,
            "{} {args:?}: stdout {} stderr {}",
            path.display(),
            out.stdout,
            out.stderr
        );
        assert!(!out.stderr.is_empty(), "says why");
    }
    let out = cli(&config, &["teams", "create", "x", "--limit", "lots"]).await;
    assert_eq!(out.code, 64, "bad --limit: {}", out.stderr);
}

// ---------------------------------------------------------------------------------------------
// 10

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_revoke_and_rotate_reach_a_running_gateway_at_once() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = write_token_file(dir.path(), TOKEN);
    let config = write_config(dir.path(), up.addr, Some((&admin_listen(), &token)), "");
    let kg = gateway_for(&config).await;

    let out = cli(&config, &["teams", "create", "acme", "--plan", "pro"]).await;
    out.ok();
    assert!(!out.stderr.contains("no running gateway"), "{}", out.stderr);
    let (key, id) = create_key(&config, "acme").await;
    let r = kg.get("/api/x", Some(&key)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed("x-keygate-key-id"), Some(id.as_str()));

    // Revoked by another process: refused on the request right after the CLI returns.
    let out = cli(&config, &["keys", "revoke", &id]).await;
    out.ok();
    assert!(
        !out.stderr.contains("no running gateway"),
        "the CLI did not reach the gateway: {}",
        out.stderr
    );
    let hits = up.hits();
    kg.get("/api/x", Some(&key))
        .await
        .assert_error(401, INVALID_KEY);
    assert_eq!(up.hits(), hits);

    // Rotated with a grace period: the printed key works, and so does the old one for now.
    let (old, old_id) = create_key(&config, "acme").await;
    assert_eq!(kg.get("/api/x", Some(&old)).await.status, 200);
    let out = cli(&config, &["keys", "rotate", &old_id, "--grace", "1h"]).await;
    out.ok();
    assert!(!out.stderr.contains("no running gateway"), "{}", out.stderr);
    let new = out.last_line().to_owned();
    assert!(is_live_key(&new), "{}", out.stdout);
    assert_ne!(new, old);
    let new_id = out.record()["key_id"].as_str().unwrap().to_owned();
    let r = kg.get("/api/x", Some(&new)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed("x-keygate-key-id"), Some(new_id.as_str()));
    let r = kg.get("/api/x", Some(&old)).await;
    assert_eq!(r.status, 200, "old key in its grace: {}", r.text());
    let store = kg.server.store.clone().unwrap();
    let old_rec = store.get_key(&old_id).unwrap().unwrap();
    assert_eq!(old_rec.replaced_by.as_deref(), Some(new_id.as_str()));
    let grace_end = old_rec.expires_at.expect("the grace ends");
    let now = keygate::clock::wall_now_ms();
    assert!(
        (now + 3_590_000..=now + 3_600_000).contains(&grace_end),
        "grace ends {} ms from now",
        grace_end - now
    );
}

/// Without an admin token in its config the CLI cannot tell the gateway; the gateway notices
/// the store change by itself within about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_notices_a_revocation_it_was_not_told_about() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = write_token_file(dir.path(), TOKEN);
    let config = write_config(dir.path(), up.addr, Some((&admin_listen(), &token)), "");
    let kg = gateway_for(&config).await;
    let quiet_dir = dir.path().join("quiet");
    std::fs::create_dir(&quiet_dir).unwrap();
    let quiet = quiet_dir.join("keygate.toml");
    let mut cfg = Cfg::new(up.addr);
    cfg.state_dir = Some(dir.path().join("state"));
    write_file(&quiet, &cfg.render());

    cli(&quiet, &["teams", "create", "acme", "--plan", "pro"])
        .await
        .ok();
    let (key, _) = create_key(&quiet, "acme").await;
    let (_, id) = {
        // The key must be cached before it is revoked.
        let r = kg.get("/api/x", Some(&key)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        ((), r.echoed("x-keygate-key-id").unwrap().to_owned())
    };
    cli(&quiet, &["keys", "revoke", &id]).await.ok();
    let started = std::time::Instant::now();
    poll_until(
        Duration::from_secs(5),
        "the gateway to refuse the revoked key",
        || async {
            let r = kg.get("/api/x", Some(&key)).await;
            match r.status {
                200 => None,
                _ => Some(r),
            }
        },
    )
    .await
    .assert_error(401, INVALID_KEY);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "noticed after {took:?}");
}

// ---------------------------------------------------------------------------------------------
// 11

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cli_writers_under_proxy_load_all_succeed() {
    const WRITERS: usize = 8;
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = write_token_file(dir.path(), TOKEN);
    let config = write_config(
        dir.path(),
        up.addr,
        Some((&admin_listen(), &token)),
        "[keys]\nmax_active_per_team = 1000\n",
    );
    let kg = Arc::new(gateway_for(&config).await);
    cli(
        &config,
        &["teams", "create", "load", "--limit", "1000000/1h"],
    )
    .await
    .ok();
    let (key, _) = create_key(&config, "load").await;

    // A steady stream of proxied requests while the writers run.
    let stop = Arc::new(tokio::sync::Notify::new());
    let sent = Arc::new(AtomicUsize::new(0));
    let stream = {
        let (kg, stop, sent, key) = (kg.clone(), stop.clone(), sent.clone(), key.clone());
        tokio::spawn(async move {
            let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    r = async {
                        // Dropping the cache first makes every request a store read, beside
                        // the writers.
                        let inv = kg
                            .admin_call(
                                http::Method::POST,
                                "/admin/cache/invalidate",
                                Some(TOKEN),
                                Some(&serde_json::json!({})),
                            )
                            .await;
                        assert_eq!(inv.status, 200, "{}", inv.text());
                        kg.get("/api/x", Some(&key)).await
                    } => {
                        *statuses.entry(r.status).or_default() += 1;
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            statuses
        })
    };
    poll_until(Duration::from_secs(10), "the stream to start", || async {
        (sent.load(Ordering::SeqCst) >= 5).then_some(())
    })
    .await;

    let lookups = || {
        metric(
            &kg.server.gate.metrics().render(),
            "keygate_store_lookups_total",
        )
        .unwrap()
    };
    let before = sent.load(Ordering::SeqCst);
    let lookups_before = lookups();
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            let config = config.clone();
            tokio::spawn(async move {
                cli(
                    &config,
                    &[
                        "keys",
                        "create",
                        "--team",
                        "load",
                        "--name",
                        &format!("w{i}"),
                    ],
                )
                .await
            })
        })
        .collect();
    let mut outs = Vec::new();
    for w in writers {
        outs.push(w.await.unwrap());
    }
    // The stream keeps going until it has made a few requests since the writers started, so it
    // overlapped them whatever the machine's speed (a fixed count inside the window is a race).
    poll_until(
        Duration::from_secs(10),
        "requests beside the writers",
        || async { (sent.load(Ordering::SeqCst) >= before + 3).then_some(()) },
    )
    .await;
    let during = sent.load(Ordering::SeqCst) - before;
    let lookups_during = lookups() - lookups_before;
    stop.notify_one();
    let statuses = stream.await.unwrap();

    let mut new_ids = Vec::new();
    let mut new_keys = Vec::new();
    for out in &outs {
        out.ok();
        assert!(
            !out.stderr.to_lowercase().contains("locked")
                && !out.stdout.to_lowercase().contains("locked"),
            "{}",
            out.stderr
        );
        assert!(is_live_key(out.last_line()), "{}", out.stdout);
        new_keys.push(out.last_line().to_owned());
        new_ids.push(out.record()["key_id"].as_str().unwrap().to_owned());
    }
    new_ids.sort();
    new_ids.dedup();
    assert_eq!(new_ids.len(), WRITERS, "distinct key ids");

    let out = cli(&config, &["keys", "list", "--team", "load"]).await;
    out.ok();
    let listed: Value = serde_json::from_str(&out.stdout).unwrap();
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), WRITERS + 1, "{listed:?}");
    for id in &new_ids {
        assert!(listed.contains(&id.as_str()), "{id} not listed");
    }

    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [200],
        "proxied requests during the writes: {statuses:?}"
    );
    assert!(during >= 3, "only {during} requests while the writers ran");
    assert!(
        // (one request may have been looked up just before the count began)
        lookups_during + 1.0 >= during as f64,
        "{lookups_during} store lookups for {during} requests"
    );
    // And the new keys work.
    for k in &new_keys {
        assert_eq!(kg.get("/api/x", Some(k)).await.status, 200);
    }
}
