//! The command line: `run`, `check-config`, `hash-key`, `demo`, and key and team management.
//!
//! Exit codes: 0 success, 1 runtime failure, 64 (`EX_USAGE`) for a config that does not
//! validate or bad arguments, 65 for a refused operation (unknown key or team, key limit
//! reached).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{Config, LogFormat};
use crate::server::{Options, Server};

const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version,
    about = "An authenticating reverse-proxy gateway: API keys, plan limits, heartbeats."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway with a config file.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and report every problem; exit 64 if it is invalid.
    CheckConfig {
        /// The TOML config file.
        path: PathBuf,
    },
    /// Read a key on standard input and print its SHA-256 digest (for `teams.keys.sha256`).
    HashKey,
    /// Run the example config with a built-in echo upstream, and print what to try.
    Demo {
        /// Use this config instead of the built-in example.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Issue, list, revoke and rotate keys in the config's store (state.dir).
    Keys {
        /// The config whose store to use (a running gateway on it sees the change at once).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Create, update and list teams in the config's store.
    Teams {
        /// The config whose store to use.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: TeamsAction,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Make a key; prints its record, then the key itself as the last line (shown only once).
    Create {
        #[arg(long)]
        team: String,
        #[arg(long)]
        name: Option<String>,
        /// Comma-separated scopes, e.g. posts:read,posts:write
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Environment (a name in keys.prefixes): live or test.
        #[arg(long, default_value = "live")]
        env: String,
        /// Lifetime, e.g. 90d; keys do not expire by default.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<std::time::Duration>,
    },
    /// List keys (never the keys themselves: ids, prefixes, state and usage).
    List {
        #[arg(long)]
        team: Option<String>,
    },
    /// Revoke a key; a running gateway refuses it on the next request.
    Revoke { key_id: String },
    /// Make a new key with the same team and scopes; the old one keeps working for --grace.
    Rotate {
        key_id: String,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        grace: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum TeamsAction {
    /// Create a team on a plan from the config, or with custom limits.
    Create(TeamArgs),
    /// Change a team's plan, limits or heartbeat rule.
    Update(TeamArgs),
    /// List the config's and the store's teams.
    List,
}

#[derive(Debug, clap::Args)]
struct TeamArgs {
    id: String,
    #[arg(long)]
    plan: Option<String>,
    /// A custom limit, REQUESTS/PERIOD[:BURST], e.g. 20000/1h or 600/1m:100 (repeatable).
    #[arg(long = "limit")]
    limits: Vec<String>,
    /// Whether the team must keep its extension heartbeat fresh.
    #[arg(long)]
    heartbeat_required: Option<bool>,
}

const EX_REFUSED: u8 = 65;

fn parse_limit(s: &str) -> Result<crate::manage::LimitRequest, String> {
    let (n, rest) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected REQUESTS/PERIOD[:BURST]"))?;
    let (per, burst) = match rest.split_once(':') {
        Some((p, b)) => (
            p,
            Some(b.parse::<u32>().map_err(|_| format!("{s:?}: bad burst"))?),
        ),
        None => (rest, None),
    };
    Ok(crate::manage::LimitRequest {
        requests: n.parse().map_err(|_| format!("{s:?}: bad request count"))?,
        per: humantime::parse_duration(per).map_err(|e| format!("{s:?}: {e}"))?,
        burst,
    })
}

/// Opens the store of `--config` (or `keygate.toml` in the working directory).
fn open_managed(
    config: Option<PathBuf>,
) -> Result<(Config, crate::store::sqlite::SqliteStore), ExitCode> {
    let path = config.unwrap_or_else(|| PathBuf::from("keygate.toml"));
    let c = Config::load(&path).map_err(|e| {
        eprintln!("{}: {e}", path.display());
        ExitCode::from(EX_USAGE)
    })?;
    let Some(dir) = c.state_dir().map(Path::to_owned) else {
        eprintln!("{}: set state.dir to keep keys in a store", path.display());
        return Err(ExitCode::from(EX_USAGE));
    };
    let store = crate::server::open_store(&dir).map_err(|e| {
        eprintln!("cannot open the store in {}: {e}", dir.display());
        ExitCode::FAILURE
    })?;
    Ok((c, store))
}

/// Tells a running gateway on this config to drop cached keys (one, or all); best effort —
/// without an answer it notices the store change within a second by itself.
fn notify_gateway(config: &Config, key_id: Option<&str>) {
    let Some(token) = crate::server::load_admin_token(config) else {
        return;
    };
    let addr = config.admin.listen;
    let body = match key_id {
        Some(id) => serde_json::json!({ "key_id": id }).to_string(),
        None => "{}".to_owned(),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return,
    };
    let sent = rt.block_on(async move {
        use http_body_util::Full;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<bytes::Bytes>>();
        let req = http::Request::post(format!("http://{addr}/admin/cache/invalidate"))
            .header(
                http::header::AUTHORIZATION,
                [b"Bearer ".as_slice(), &token].concat(),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .ok()?;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(2), client.request(req))
            .await
            .ok()?
            .ok()?;
        resp.status().is_success().then_some(())
    });
    if sent.is_none() {
        eprintln!("note: no running gateway answered on {addr}; a running one picks the change up within a second");
    }
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn refused(e: crate::manage::ManageError) -> ExitCode {
    eprintln!("refused: {e}");
    match e {
        crate::manage::ManageError::Store(_) => ExitCode::FAILURE,
        _ => ExitCode::from(EX_REFUSED),
    }
}

fn keys(config: Option<PathBuf>, action: KeysAction) -> ExitCode {
    let (c, store) = match open_managed(config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let now = crate::clock::wall_now_ms();
    match action {
        KeysAction::Create {
            team,
            name,
            scopes,
            env,
            expires,
        } => {
            let req = crate::manage::KeyRequest {
                team,
                name,
                scopes,
                environment: Some(env),
                expires_in: expires,
            };
            match crate::manage::create_key(&c, &store, &req, now) {
                Ok(k) => {
                    print_json(&k.info);
                    println!("{}", k.key);
                    ExitCode::SUCCESS
                }
                Err(e) => refused(e),
            }
        }
        KeysAction::List { team } => match store.list_keys(team.as_deref()) {
            Ok(keys) => {
                print_json(&keys);
                ExitCode::SUCCESS
            }
            Err(e) => refused(e.into()),
        },
        KeysAction::Revoke { key_id } => match crate::manage::revoke_key(&store, &key_id, now) {
            Ok(_) => {
                notify_gateway(&c, Some(&key_id));
                println!("revoked {key_id}");
                ExitCode::SUCCESS
            }
            Err(e) => refused(e),
        },
        KeysAction::Rotate { key_id, grace } => {
            match crate::manage::rotate_key(&c, &store, &key_id, grace, now) {
                Ok((k, _)) => {
                    notify_gateway(&c, Some(&key_id));
                    print_json(&k.info);
                    println!("{}", k.key);
                    ExitCode::SUCCESS
                }
                Err(e) => refused(e),
            }
        }
    }
}

fn teams(config: Option<PathBuf>, action: TeamsAction) -> ExitCode {
    let (c, store) = match open_managed(config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let now = crate::clock::wall_now_ms();
    let args = match action {
        TeamsAction::List => {
            return match crate::manage::list_teams(&c, &store) {
                Ok(t) => {
                    print_json(&t);
                    ExitCode::SUCCESS
                }
                Err(e) => refused(e),
            }
        }
        TeamsAction::Create(a) | TeamsAction::Update(a) => a,
    };
    let limits = match args
        .limits
        .iter()
        .map(|l| parse_limit(l))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let req = crate::manage::TeamRequest {
        id: args.id.clone(),
        plan: args.plan,
        limits,
        heartbeat_required: args.heartbeat_required,
    };
    match crate::manage::upsert_team(&c, &store, &req, now) {
        Ok(()) => {
            notify_gateway(&c, None);
            println!("team {} saved", args.id);
            ExitCode::SUCCESS
        }
        Err(e) => refused(e),
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { path } => match Config::load(&path) {
            Ok(c) => {
                println!(
                    "{}: ok ({} routes, {} plans, {} teams)",
                    path.display(),
                    c.routes.len(),
                    c.plans.len(),
                    c.teams.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                ExitCode::from(EX_USAGE)
            }
        },
        Command::HashKey => {
            let mut s = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                eprintln!("cannot read standard input: {e}");
                return ExitCode::FAILURE;
            }
            let key = s.trim_end_matches(['\n', '\r']);
            if key.is_empty() {
                eprintln!("no key on standard input");
                return ExitCode::from(EX_USAGE);
            }
            println!("{}", hex::encode(crate::gate::keys::digest(key.as_bytes())));
            ExitCode::SUCCESS
        }
        Command::Run { config } => match Config::load(&config) {
            Ok(c) => run(c, Some(config), false),
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Keys { config, action } => keys(config, action),
        Command::Teams { config, action } => teams(config, action),
        Command::Demo { config } => {
            let loaded = match &config {
                Some(p) => Config::load(p),
                None => Config::from_toml(crate::demo::EXAMPLE_CONFIG),
            };
            match loaded {
                Ok(c) => run(c, config, true),
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EX_USAGE)
                }
            }
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn run(config: Config, path: Option<PathBuf>, demo: bool) -> ExitCode {
    init_logging(&config);
    // The first worker's runtime, which also runs the admin API and the background work; the
    // other workers get runtimes of their own (`Server::run_workers`).
    let rt = match crate::server::worker_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = rt.block_on(async move {
        let (proxy_l, admin_l) = crate::server::bind(&config).await?;
        let upstream = demo.then(|| config.upstream.url.clone());
        let proxy_addr = proxy_l[0].local_addr()?;
        let admin_addr = admin_l.local_addr()?;
        let registry = prometheus::Registry::new();
        let opts = Options {
            metrics: crate::metrics::Metrics::new(registry)?,
            config_path: path.clone(),
            ..Options::default()
        };
        let server = Arc::new(Server::new(config, opts));
        let (tx, rx) = watch::channel(false);
        if let Some(url) = upstream {
            let addr = format!(
                "{}:{}",
                url.host().unwrap_or("127.0.0.1"),
                url.port_u16().unwrap_or(80)
            );
            let l = tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| anyhow::anyhow!("demo upstream cannot listen on {addr}: {e}"))?;
            tokio::spawn(crate::demo::echo_upstream(l, rx.clone()));
            println!("{}", crate::demo::banner(&proxy_addr.to_string(), &admin_addr.to_string()));
        }
        tracing::info!(proxy = %proxy_addr, admin = %admin_addr, workers = proxy_l.len(), config = ?path.as_deref().map(Path::display).map(|d| d.to_string()), "keygate listening");
        tokio::spawn(crate::signal::handle(server.clone(), tx));
        server.run_workers(proxy_l, admin_l, rx).await;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
