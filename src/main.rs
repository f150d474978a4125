//! `flotilla`: one binary for the coordinator, the agent, and the operator commands.
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before anything can panic: a panic's message is printed with every password and
    // token the process holds scrubbed from it (DESIGN invariant 8).
    std::panic::set_hook(Box::new(flotilla_core::secrets::panic_hook));
    let cli = flotilla::cli::Cli::parse();
    if cli.prints_and_ends() {
        // `flotilla plan list | head -3`: a reader that stops reading ends the command
        // quietly, as it does `ls` or `grep`, instead of a panic printing to a closed pipe
        // (exit 101). Rust ignores SIGPIPE from the start; its default is restored for the
        // commands that print and end only (a daemon's sockets must never raise it).
        // SAFETY: no other thread runs yet, and SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    flotilla::cli::init_logging(&cli);
    // `--threads`, else one for an agent and the operator commands (see `worker_threads`).
    // One thread is this one: with a runtime worker beside it, every hand-over between the
    // main task and the tasks it spawned (an agent's stream and its lanes) woke the other
    // thread, a context switch each on cores the shard's own backends need.
    let mut builder = match cli.worker_threads() {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
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
