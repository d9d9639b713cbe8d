//! The command line: `run`, `check-config`, `hash-key`, `demo`, and key and team management.
//!
//! Exit codes: 0 success, 1 runtime failure, 64 (`EX_USAGE`) for a config that does not
//! validate, 65 for a refused operation (unknown key, key limit reached).

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

fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = if workers == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        workers
    };
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

fn run(config: Config, path: Option<PathBuf>, demo: bool) -> ExitCode {
    init_logging(&config);
    let rt = match runtime(config.proxy.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = rt.block_on(async move {
        let (proxy_l, admin_l) = crate::server::bind(&config).await?;
        let upstream = demo.then(|| config.upstream.url.clone());
        let proxy_addr = proxy_l.local_addr()?;
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
        tracing::info!(proxy = %proxy_addr, admin = %admin_addr, config = ?path.as_deref().map(Path::display).map(|d| d.to_string()), "keygate listening");
        tokio::spawn(crate::signal::handle(server.clone(), tx));
        server.run(proxy_l, admin_l, rx).await;
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
