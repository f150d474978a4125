//! Issue 11, "gRPC and logs": the standard health and reflection services as a
//! load balancer or grpcurl sees them ([`grpc`]), JSON log lines with their fields
//! ([`logs`]), and the shell completions and manual page ([`manual`]).
mod grpc;
mod logs;
mod manual;

use crate::fleet::WAIT;
use crate::harness::{FlotillaProcess, TestDir, free_port};

/// A coordinator on its own (embedded backend, SQLite store): it leads at once.
pub async fn lone_coordinator(
    dir: &TestDir,
    extra: &[&str],
) -> anyhow::Result<(FlotillaProcess, String)> {
    let listen = format!("127.0.0.1:{}", free_port());
    let store = dir.join("flotilla.db").to_string_lossy().into_owned();
    let mut args = vec!["coordinator", "--listen", &listen, "--store", &store];
    args.extend_from_slice(extra);
    let c = FlotillaProcess::spawn(&args, &[])?;
    c.wait_for_log("coordinator listening", WAIT).await?;
    Ok((c, format!("http://{listen}")))
}
