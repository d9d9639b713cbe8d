//! Process signals: SIGTERM/SIGINT drain and stop, SIGHUP reloads the config.

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::server::Server;

/// Maps signals onto the server until shutdown: the first SIGTERM or SIGINT sets `shutdown`;
/// each SIGHUP reloads (a refused reload is logged and the old config keeps serving).
pub async fn handle(server: Arc<Server>, shutdown: watch::Sender<bool>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break; }
            _ = hup.recv() => {
                let s = server.clone();
                let _ = tokio::task::spawn_blocking(move || s.reload()).await;
            }
        }
    }
    let _ = shutdown.send(true);
    Ok(())
}
