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
        // quietly, as it does `ls` or `grep` (exit 141, as a shell reports a process that
        // SIGPIPE ended), instead of a panic printing to a closed pipe (exit 101 and a
        // backtrace). Not by SIGPIPE's default disposition: a connection the coordinator
        // closes would then kill the command before it could say why. Not for a daemon: a
        // task of it that panicked must be logged, not end the process.
        std::panic::set_hook(Box::new(|info| {
            if closed_stdout(info) {
                std::process::exit(141);
            }
            // Any other failed write to stdout (a full disk, /dev/full): said, with what it
            // means, and exit 3 rather than a panic's 101 (a submit had stored its plan,
            // and a pipeline got neither its id nor a documented code).
            if let Some(why) = stdout_failed(info) {
                eprintln!(
                    "error: writing to stdout failed ({why}); the command may have taken effect: \
                     `flotilla plan list` and `flotilla audit list` say what it did"
                );
                std::process::exit(3);
            }
            flotilla_core::secrets::panic_hook(info)
        }));
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

/// The reason of a panic that is println!'s failed write to stdout (other than to a closed
/// pipe).
fn stdout_failed(info: &std::panic::PanicHookInfo<'_>) -> Option<String> {
    let message = info
        .payload()
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| info.payload().downcast_ref::<&str>().copied())?;
    message
        .strip_prefix("failed printing to stdout: ")
        .or_else(|| message.strip_prefix("failed to write completion file: "))
        .map(str::to_string)
}

/// Whether a panic is a write to a stdout whose reader has gone (EPIPE): println!'s, or a
/// library's writing to it (the completions' generator). Errors on sockets come back as
/// errors, never as panics.
fn closed_stdout(info: &std::panic::PanicHookInfo<'_>) -> bool {
    let message = info
        .payload()
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| info.payload().downcast_ref::<&str>().copied())
        .unwrap_or_default();
    (message.starts_with("failed printing to stdout") && message.contains("os error 32"))
        || (message.starts_with("failed to write completion file")
            && message.contains("kind: BrokenPipe"))
}
