//! Faults behind and around keygate, each with its documented answer and a healthy process
//! afterwards: an upstream that is away and comes back, resets mid-response or times out; a
//! reload under load; and a state directory that runs out of space.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;

const BAD_GATEWAY: &str = r#"{"error":"Bad Gateway: the upstream is unavailable"}"#;

async fn upstream_connections(kg: &Keygate) -> f64 {
    metric(&kg.metrics().await, "keygate_upstream_connections_total").unwrap_or(0.0)
}

#[tokio::test]
async fn an_upstream_that_refuses_is_502_and_is_used_again_when_it_returns() {
    let addr = closed_port();
    let kg = Keygate::start(&base_toml(addr)).await;
    for _ in 0..3 {
        kg.get("/api/x", Some(ALPHA_KEY))
            .await
            .assert_error(502, BAD_GATEWAY);
    }
    assert_eq!(upstream_connections(&kg).await, 0.0);
    let up = Upstream::start_at(addr).await;
    for _ in 0..3 {
        assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    }
    assert_eq!(up.hits(), 3);
    assert_eq!(
        upstream_connections(&kg).await,
        1.0,
        "one pooled connection"
    );
}

/// An upstream whose first connection promises 100,000 bytes, sends 1,000 and is reset; every
/// later connection answers `ok` with keep-alive. Returns its address and connections accepted.
async fn resetting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    raw_upstream(|mut s, n| async move {
        while read_head(&mut s).await.is_some() {
            if n == 0 {
                let mut half = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
                half.extend_from_slice(&[b'x'; 1000]);
                s.write_all(&half).await.unwrap();
                s.flush().await.unwrap();
                // RST instead of FIN.
                #[allow(deprecated)]
                s.set_linger(Some(Duration::ZERO)).unwrap();
                return;
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
        }
    })
    .await
}

#[tokio::test]
async fn an_upstream_reset_mid_response_cuts_that_response_and_its_connection_is_not_reused() {
    let (addr, accepted) = resetting_upstream().await;
    let kg = Keygate::start(&base_toml(addr)).await;
    let resp = kg.get_streamed("/api/x").await;
    assert_eq!(resp.status(), 200, "the head had already come");
    assert!(
        resp.bytes().await.is_err(),
        "a truncated body must reach the client as an error, not as a shorter body"
    );
    for _ in 0..5 {
        let r = kg.get("/api/x", Some(ALPHA_KEY)).await;
        assert_eq!((r.status, r.text()), (200, "ok"));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the reset connection was dropped"
    );
    assert_eq!(upstream_connections(&kg).await, 2.0);
}

#[tokio::test]
async fn a_timed_out_upstream_connection_is_not_reused() {
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.upstream_extra
        .push(r#"request_timeout = "200ms""#.into());
    let kg = Keygate::start(&cfg.render()).await;
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    kg.get("/api/slow", Some(ALPHA_KEY)).await.assert_error(
        504,
        r#"{"error":"Gateway Timeout: the upstream did not answer in time"}"#,
    );
    up.slow_arrived().await;
    up.release_slow(1);
    for _ in 0..3 {
        assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    }
    // The first connection carried the timed-out request; its late answer must never be read
    // as the answer to another request, so a second connection serves the rest.
    assert_eq!(upstream_connections(&kg).await, 2.0);
    assert_eq!(up.hits(), 5);
}

/// Four clients keep requests in flight while the config is reloaded ten times: every request
/// is answered 200, and the last reload's change (a new team key) is in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_reloads_under_load_drop_no_request() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    let mut cfg = Cfg::new(up.addr);
    // The clock is frozen, so no bucket refills: the plan must outlast however many requests
    // this machine fits between reloads (with `pro`'s 1,000 a faster keygate ran out).
    cfg.tiny_limit = 10_000_000;
    write_file(&path, &cfg.render());
    let kg = Arc::new(
        Keygate::start_with(
            &cfg.render(),
            keygate::clock::Clock::manual(T0),
            Some(path.clone()),
        )
        .await,
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (kg, stop) = (kg.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                statuses.push(kg.get("/api/x", Some(TINY_KEY)).await.status);
            }
            statuses
        }));
    }
    for i in 0..10 {
        cfg.messages
            .push(("not_found".to_owned(), format!("Nothing here, version {i}")));
        write_file(&path, &cfg.render());
        kg.server.reload().expect("a valid edit");
        // Let requests run under each config.
        let seen = up.hits();
        poll_until(Duration::from_secs(10), "requests after the reload", || {
            let now = up.hits();
            async move { (now > seen + 20).then_some(()) }
        })
        .await;
        cfg.messages.clear();
    }
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for c in clients {
        let statuses = c.await.unwrap();
        total += statuses.len();
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    }
    assert!(total >= 200, "only {total} requests ran");
    let m = kg.metrics().await;
    assert_eq!(
        metric(&m, r#"keygate_config_reloads_total{result="ok"}"#),
        Some(10.0),
        "{m}"
    );
    kg.get("/nowhere", None)
        .await
        .assert_error(404, r#"{"error":"Nothing here, version 9"}"#);
}

// ---------------------------------------------------------------------------------------------
// A state directory out of space (a real tmpfs of a few hundred KiB; needs root, as CI has).

struct Tmpfs {
    _parent: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `kib` KiB, or `None` when not root (mounting needs it).
    fn mount(kib: usize) -> Option<Tmpfs> {
        let euid = std::process::Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&euid.stdout).trim() != "0" {
            eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
            return None;
        }
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("state");
        std::fs::create_dir(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs at {}", path.display());
        Some(Tmpfs {
            _parent: parent,
            path,
        })
    }

    /// Fills the free space with a file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// With the state disk full, heartbeats keep working from memory and the failed writes are
/// counted; once there is space again the pending heartbeat is written, so a restart still
/// knows it.
#[tokio::test]
async fn a_full_state_disk_keeps_heartbeats_in_memory_and_loses_none() {
    let Some(disk) = Tmpfs::mount(512) else {
        return;
    };
    let up = Upstream::start().await;
    let mut cfg = Cfg::new(up.addr);
    cfg.heartbeat_required = true;
    cfg.state_dir = Some(disk.path.clone());
    let kg = Keygate::start(&cfg.render()).await;
    assert!(kg.server.store.is_some(), "the store opened on the tmpfs");
    let filler = disk.fill();

    assert_eq!(kg.heartbeat(ALPHA_KEY).await.status, 200);
    assert_eq!(kg.get("/api/x", Some(ALPHA_KEY)).await.status, 200);
    poll_until(
        Duration::from_secs(10),
        "a counted write failure",
        || async {
            metric(&kg.metrics().await, "keygate_state_write_errors_total").filter(|&n| n >= 1.0)
        },
    )
    .await;
    assert_eq!(
        kg.get("/api/x", Some(ALPHA_KEY)).await.status,
        200,
        "still served from memory"
    );

    std::fs::remove_file(&filler).unwrap();
    let db = disk.path.join("keygate.db");
    poll_until(
        Duration::from_secs(10),
        "the heartbeat to be written",
        || {
            let db = db.clone();
            async move {
                let conn = rusqlite::Connection::open(&db).ok()?;
                let n: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM heartbeats WHERE team_id = 'alpha'",
                        [],
                        |r| r.get(0),
                    )
                    .ok()?;
                (n == 1).then_some(())
            }
        },
    )
    .await;
    kg.stop().await;

    let kg = Keygate::start(&cfg.render()).await;
    assert_eq!(
        kg.get("/api/x", Some(ALPHA_KEY)).await.status,
        200,
        "the heartbeat made while the disk was full survived the restart"
    );
    assert_eq!(
        kg.get("/api/x", Some(BETA_KEY)).await.status,
        403,
        "and a team that sent none is still stale"
    );
}
