use super::*;

const MINIMAL: &str = r#"
[upstream]
url = "http://127.0.0.1:3000"
[[routes]]
path = "/*"
"#;

fn errors(text: &str) -> Vec<String> {
    match Config::from_toml(text) {
        Err(ConfigError::Invalid(e)) => e,
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn minimal_config_gets_the_defaults() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.proxy.listen.to_string(), defaults::DEFAULT_PROXY_LISTEN);
    assert_eq!(c.heartbeat.window, Duration::from_secs(48 * 3600));
    assert_eq!(c.credentials.sources, vec![CredentialSource::ApiKeyHeader]);
    assert_eq!(c.cache.negative_ttl, defaults::DEFAULT_NEGATIVE_TTL);
    assert!(c.state_dir.is_none());
    assert!(c.proxy.refusal_lane);
    let off = Config::from_toml(&format!("[proxy]\nrefusal_lane = false\n{MINIMAL}")).unwrap();
    assert!(!off.proxy.refusal_lane);
}

#[test]
fn rate_headers_are_all_by_default_and_named_when_wrong() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.limits.headers, RateHeaders::All);
    for (text, want, draft, x) in [
        ("all", RateHeaders::All, true, true),
        ("draft", RateHeaders::Draft, true, false),
        ("x-ratelimit", RateHeaders::XRateLimit, false, true),
        ("none", RateHeaders::None, false, false),
    ] {
        let c = Config::from_toml(&format!("[limits]\nheaders = \"{text}\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.limits.headers, want);
        assert_eq!((want.draft(), want.x_ratelimit()), (draft, x), "{text}");
    }
    let e = errors(&format!("[limits]\nheaders = \"X-RateLimit\"\n{MINIMAL}"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("limits.headers")
            && e[0].contains("line 2")
            && e[0].contains("\"x-ratelimit\""),
        "{e:?}"
    );
}

#[test]
fn unknown_fields_are_errors_with_a_line() {
    let e = errors(&format!("{MINIMAL}\n[heartbeat]\nwindwo = \"48h\"\n"));
    assert_eq!(e.len(), 1);
    assert!(e[0].contains("windwo") && e[0].contains("line 8"), "{e:?}");
}

#[test]
fn every_problem_is_reported_with_field_and_line() {
    let text = r#"
[upstream]
url = "ftp://nowhere"
[plans.free]
limits = [{ requests = 0, per = "1h" }]
[[teams]]
id = "a"
plan = "gold"
keys = [{ sha256 = "kg_demo_plaintext" }]
[[routes]]
path = "teams/{team}"
team_param = "org"
"#;
    let e = errors(text);
    let find = |needle: &str| {
        e.iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {e:#?}"))
            .clone()
    };
    assert!(find("upstream.url").contains("line 3"));
    assert!(find("plans.free.limits[0]").contains("requests must be at least 1"));
    assert!(find("teams[0].plan").contains("line 8"));
    assert!(find("teams[0].keys[0].sha256").contains("Never put a plaintext key"));
    assert!(find("routes[0].path").contains("must start with '/'"));
    assert!(find("routes[0].team_param").contains("{org}"));
}

#[test]
fn durations_and_limits_parse() {
    let c = Config::from_toml(&format!(
        "{MINIMAL}\n[plans.basic]\nlimits = [{{ requests = 100, per = \"1m\", burst = 20 }}]\n\
         [[teams]]\nid = \"e\"\nlimits = [{{ requests = 5000, per = \"1h\" }}]\n"
    ))
    .unwrap();
    assert_eq!(
        c.plans["basic"],
        vec![LimitSpec {
            requests: 100,
            per: Duration::from_secs(60),
            burst: 20
        }]
    );
    assert!(matches!(&c.teams[0].plan, TeamPlan::Custom(l) if l[0].burst == 5000));
}

#[test]
fn a_team_needs_exactly_one_of_plan_or_limits() {
    let e = errors(&format!("{MINIMAL}\n[plans.p]\nlimits = [{{ requests = 1, per = \"1s\" }}]\n[[teams]]\nid = \"a\"\n"));
    assert!(e[0].contains("exactly one of `plan`"), "{e:?}");
}

#[test]
fn unknown_error_message_codes_are_refused() {
    let e = errors(&format!(
        "{MINIMAL}\n[errors.messages]\nmissing_api_key = \"x\"\n"
    ));
    assert!(
        e[0].contains("missing_api_key") && e[0].contains("missing_key"),
        "{e:?}"
    );
}

/// Every config shipped in config/ loads.
#[test]
fn shipped_configs_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn the_example_config_is_the_pinned_one() {
    let c = Config::from_toml(crate::demo::EXAMPLE_CONFIG).unwrap();
    assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.upstream.url, "http://127.0.0.1:3000/");
    assert_eq!(c.plans["free"][0].requests, 100);
    assert_eq!(c.plans["free"][0].per, Duration::from_secs(3600));
    assert_eq!(c.plans["pro"][0].requests, 1000);
    let demo = &c.teams[0];
    assert_eq!(demo.id, "demo");
    assert_eq!(
        demo.keys[0].digest,
        crate::gate::keys::digest(crate::demo::DEMO_KEY.as_bytes())
    );
    assert!(
        !crate::demo::EXAMPLE_CONFIG.contains(crate::demo::DEMO_KEY) || {
            // The plaintext may appear only in a comment.
            crate::demo::EXAMPLE_CONFIG
                .lines()
                .filter(|l| l.contains(crate::demo::DEMO_KEY))
                .all(|l| l.trim_start().starts_with('#'))
        }
    );
    let heartbeat = c
        .routes
        .iter()
        .find(|r| r.heartbeat == HeartbeatRule::Record)
        .unwrap();
    assert_eq!(heartbeat.path, "/extension/heartbeat");
    assert!(c
        .routes
        .iter()
        .filter(|r| r.public)
        .map(|r| r.path.as_str())
        .eq([
            "/linkedin-agent/auth-send-otp",
            "/linkedin-agent/auth-verify-otp"
        ]));
}

#[test]
fn pipelining_is_off_by_default_and_bounded() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.upstream.pipeline, 1);
    let with = |n: usize| {
        MINIMAL.replace(
            "127.0.0.1:3000\"",
            &format!("127.0.0.1:3000\"\npipeline = {n}"),
        )
    };
    assert_eq!(Config::from_toml(&with(32)).unwrap().upstream.pipeline, 32);
    for bad in [0, defaults::MAX_PIPELINE + 1] {
        let e = errors(&with(bad));
        assert!(
            e.len() == 1 && e[0].starts_with("upstream.pipeline (line 4)"),
            "{e:?}"
        );
    }
}
