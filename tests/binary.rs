//! The real binary: `run` with SIGHUP reload and SIGTERM drain, `check-config` and `hash-key`.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// A port that was free a moment ago (bind `:0`, close): the binary binds its configured address.
fn free_port() -> u16 {
    closed_port().port()
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
async fn poll<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `keygate run --config <config>`, its stderr to `log`; killed when dropped.
fn spawn_run(config: &Path, log: &Path) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start keygate")
}

fn stderr_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reload_on_sighup_and_drain_on_sigterm() {
    let up = Upstream::start().await;
    let up2 = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("keygate.toml");
    let log_path = dir.path().join("stderr.log");
    let (proxy_port, admin_port) = (free_port(), free_port());
    let render = |cfg: &Cfg| {
        cfg.render()
            .replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{proxy_port}\"\nworkers = 2"),
                1,
            )
            .replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{admin_port}\""),
                1,
            )
    };
    let mut cfg = Cfg::new(up.addr);
    write_file(&config_path, &render(&cfg));

    let mut child = spawn_run(&config_path, &log_path);
    let pid = child.id().unwrap();
    let c = client();
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let admin = format!("http://127.0.0.1:{admin_port}");

    poll(Duration::from_secs(20), "/readyz", || {
        let c = c.clone();
        let url = format!("{admin}/readyz");
        async move { c.get(url).send().await.ok().filter(|r| r.status() == 200) }
    })
    .await;

    let r = send(
        c.get(format!("{proxy}/api/x"))
            .header("x-api-key", ALPHA_KEY),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed("x-keygate-team"), Some("alpha"));
    send(c.get(format!("{proxy}/api/x")))
        .await
        .assert_error(401, MISSING_KEY);

    // Rewrite the file and send SIGHUP: the new message shows once the reload is done. The
    // upstream moves too, and every worker's pool must follow it.
    cfg.messages
        .push(("missing_key".into(), "Reloaded: send x-api-key".into()));
    cfg.upstream = format!("http://{}", up2.addr);
    write_file(&config_path, &render(&cfg));
    signal(pid, "HUP");
    poll(Duration::from_secs(10), "the reloaded config", || {
        let rb = c.get(format!("{proxy}/api/x"));
        async move { (send(rb).await.body["error"] == "Reloaded: send x-api-key").then_some(()) }
    })
    .await;
    // New connections, so the kernel spreads them over both workers' listeners: each worker's
    // pool must now reach the new upstream only.
    let before = up.hits();
    for _ in 0..20 {
        let r = send(
            client()
                .get(format!("{proxy}/api/x"))
                .header("x-api-key", ALPHA_KEY),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        up.hits(),
        before,
        "a worker still forwards to the old upstream"
    );
    assert_eq!(up2.hits(), 20);

    // A broken file on SIGHUP is refused and the process keeps serving the last good config.
    write_file(
        &config_path,
        "[proxy]\nlisten = \"127.0.0.1:1\"\nbogus = true\n",
    );
    signal(pid, "HUP");
    poll(
        Duration::from_secs(10),
        "the refused reload to be counted",
        || {
            let rb = c.get(format!("{admin}/metrics"));
            async move {
                let r = send(rb).await;
                metric(
                    r.text(),
                    r#"keygate_config_reloads_total{result="refused"}"#,
                )
                .filter(|&n| n >= 1.0)
            }
        },
    )
    .await;
    let r = send(c.get(format!("{proxy}/api/x"))).await;
    r.assert_error(401, r#"{"error":"Reloaded: send x-api-key"}"#);
    assert_eq!(
        send(
            c.get(format!("{proxy}/api/x"))
                .header("x-api-key", ALPHA_KEY)
        )
        .await
        .status,
        200
    );

    // SIGTERM: drain and exit 0.
    signal(pid, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "keygate did not exit after SIGTERM; stderr:\n{}",
                stderr_of(&log_path)
            )
        })
        .unwrap();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", stderr_of(&log_path));
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", proxy_port))
        .await
        .is_err());
}

#[test]
fn check_config_names_the_bad_fields_and_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[upstream]\n\
         url = \"ftp://nope\"\n\
         \n\
         [[routes]]\n\
         path = \"/*\"\n\
         heartbeat = \"sometimes\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("upstream.url (line 2)"), "{stderr}");
    assert!(stderr.contains("routes[0].heartbeat (line 6)"), "{stderr}");

    // A typo'd field (deny_unknown_fields) is named with its line too.
    std::fs::write(
        &path,
        "[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n[proxy]\nlisten_addr = \"x\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(
        stderr.contains("listen_addr") && stderr.contains("line 5"),
        "{stderr}"
    );
}

#[test]
fn check_config_accepts_the_shipped_config() {
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/keygate.toml"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
}

#[test]
fn run_with_a_bad_config_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[upstream]\nurl = \"not a url\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.url (line 2)"));
}

#[test]
fn hash_key_prints_the_digest() {
    use std::io::Write;
    let mut child = std::process::Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"kg_demo_0123456789abcdef\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "56347eeb9db8bb3ad93929e2767343573294da731003b881688b6110a9e851e3"
    );
    assert_eq!(
        sha256_hex("kg_demo_0123456789abcdef"),
        String::from_utf8_lossy(&out.stdout).trim()
    );
}

/// SIGTERM while clients keep requests coming and three requests wait at the upstream: the
/// listener closes, the waiting requests finish with their full answers, every answered
/// request is a 200 (clients see refused connections, never a 5xx or a cut body), and the
/// process exits 0 well within its drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_what_is_in_flight() {
    let up = std::sync::Arc::new(Upstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("keygate.toml");
    let log_path = dir.path().join("stderr.log");
    let proxy_port = free_port();
    let toml = Cfg::new(up.addr).render().replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{proxy_port}\"\nworkers = 3\ndrain_timeout = \"20s\""),
        1,
    );
    write_file(&config_path, &toml);
    let mut child = spawn_run(&config_path, &log_path);
    let pid = child.id().unwrap();
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let c = client();
    poll(Duration::from_secs(20), "the proxy to answer", || {
        let rb = c
            .get(format!("{proxy}/api/x"))
            .header("x-api-key", ALPHA_KEY);
        async move { rb.send().await.ok().filter(|r| r.status() == 200) }
    })
    .await;
    // Three workers: the first on the main thread, two on threads of their own. A new thread
    // takes its name only once it runs, so the names are polled for.
    let thread_names = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim().to_owned())
            .collect()
    };
    let threads = poll(Duration::from_secs(10), "two named worker threads", || {
        let names = thread_names();
        let both = ["keygate-w1", "keygate-w2"]
            .iter()
            .all(|w| names.iter().any(|t| t == w));
        async move { both.then_some(names) }
    })
    .await;
    assert!(!threads.iter().any(|t| t == "keygate-w3"), "{threads:?}");

    let slow: Vec<_> = (0..3)
        .map(|_| {
            let rb = c
                .get(format!("{proxy}/api/slow"))
                .header("x-api-key", BETA_KEY);
            tokio::spawn(send(rb))
        })
        .collect();
    for _ in 0..3 {
        up.slow_arrived().await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (c, proxy, stop) = (client(), proxy.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut answered, mut refused) = (Vec::new(), 0usize);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let sent = c
                        .get(format!("{proxy}/api/x"))
                        .header("x-api-key", BETA_KEY)
                        .send()
                        .await;
                    match sent {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let body = r.bytes().await.map(|b| b.len()).unwrap_or(0);
                            answered.push((status, body));
                        }
                        Err(_) => refused += 1,
                    }
                }
                (answered, refused)
            })
        })
        .collect();
    let before = up.hits();
    poll(Duration::from_secs(10), "load to flow", || {
        let now = up.hits();
        async move { (now > before + 50).then_some(()) }
    })
    .await;

    signal(pid, "TERM");
    poll(Duration::from_secs(10), "the listener to close", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", proxy_port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "keygate must wait for the requests in flight"
    );
    up.release_slow(3);
    for s in slow {
        let r = s.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body["slow"], "released");
    }
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap_or_else(|_| panic!("no exit after the drain; stderr:\n{}", stderr_of(&log_path)))
        .unwrap();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", stderr_of(&log_path));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    for l in load {
        let (answered, _refused) = l.await.unwrap();
        total += answered.len();
        for (status, body) in &answered {
            assert_eq!(*status, 200, "an answered request during the drain");
            assert!(*body > 0, "an answer's body was cut");
        }
    }
    assert!(total > 50, "only {total} requests answered");
}
