//! `flotilla`: one binary for the coordinator, the agent, and the operator commands.
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before anything can panic: a panic's message is printed with every password and
    // token the process holds scrubbed from it (DESIGN invariant 8).
    std::panic::set_hook(Box::new(flotilla_core::secrets::panic_hook));
    let cli = flotilla::cli::Cli::parse();
    flotilla::cli::init_logging(&cli);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // `--threads`, else one for an agent and the operator commands (see `worker_threads`)
    if let Some(n) = cli.worker_threads() {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let code = runtime.block_on(flotilla::cli::run(cli));
    ExitCode::from(code)
}
