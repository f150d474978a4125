//! `flotilla completions SHELL` and `flotilla man`: generated from the same clap
//! definition as the parser, so they cannot drift from the flags.
use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, EXIT_OK, EXIT_UNAVAILABLE};

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: Shell) -> u8 {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, "flotilla", &mut out);
    match out.flush() {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: writing the completions: {e}");
            EXIT_UNAVAILABLE
        }
    }
}

/// Sections clap does not know about, in roff, after the generated ones.
const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Success.
.TP
\fB1\fR
The plan failed or was rolled back.
.TP
\fB2\fR
Bad input: files, flags, or a plan the coordinator refused. Nothing was changed.
.TP
\fB3\fR
Flotilla could not do it: the coordinator is unreachable, or a daemon failed to start.
.TP
\fB4\fR
The plan waits at a wave's manual gate (\fBflotilla plan promote\fR lets it go on).
"#;

const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
\fBFLOTILLA_COORDINATOR\fR
The coordinators' gRPC addresses, comma-separated (\fB--coordinator\fR).
.TP
\fBFLOTILLA_LOG\fR, \fBRUST_LOG\fR
The log filter (\fB--log\fR); RUST_LOG wins.
.TP
\fBFLOTILLA_LOG_FORMAT\fR
\fBtext\fR or \fBjson\fR (\fB--log-format\fR).
.TP
\fBFLOTILLA_STORE\fR
The coordinator's control store (\fB--store\fR).
.TP
\fBFLOTILLA_ETCD\fR
etcd endpoints, comma-separated (\fB--etcd\fR).
.TP
\fBFLOTILLA_SHARD_DSN\fR, \fBFLOTILLA_SHARD_PASSWORD\fR
The agent's shard database and its password (never in argv).
.TP
\fBFLOTILLA_THREADS\fR
Runtime worker threads (\fB--threads\fR).
"#;

const EXAMPLES: &str = r#".SH EXAMPLES
.nf
flotilla coordinator --listen 127.0.0.1:7070 --store flotilla.db
flotilla agent --shard shard_0 --dsn postgres://app@db0:5432/shard_0 --tenant-pattern 'tenant_%'
flotilla plan lint examples/coord-2025-001
flotilla plan submit examples/coord-2025-001 --wait
flotilla plan watch PLAN_ID
flotilla completions bash > /etc/bash_completion.d/flotilla
flotilla man --out-dir /usr/local/share/man/man1
.fi
"#;

/// Prints the manual page (roff) on stdout, or writes one page per command
/// (`flotilla.1`, `flotilla-plan-submit.1`, ...) into `out_dir`.
pub fn man(out_dir: Option<&Path>) -> u8 {
    let result = match out_dir {
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
            .map_err(|e| format!("writing manual pages to {}: {e}", dir.display())),
        None => {
            let mut out = std::io::stdout().lock();
            match render_main_page(&mut out).and_then(|()| out.flush()) {
                // `flotilla man | head`: a reader that stops reading ends it quietly, as
                // every printing command does (exit 141, see main)
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return 141,
                r => r.map_err(|e| format!("writing the manual page: {e}")),
            }
        }
    };
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_UNAVAILABLE
        }
    }
}

fn render_main_page(out: &mut dyn Write) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(Cli::command());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    out.write_all(EXIT_STATUS.as_bytes())?;
    out.write_all(ENVIRONMENT.as_bytes())?;
    out.write_all(EXAMPLES.as_bytes())?;
    man.render_version_section(out)
}
