//! `flotilla completions` and `flotilla man`.
use crate::harness::{TestDir, run_flotilla};

#[tokio::test(flavor = "multi_thread")]
async fn completions_and_the_manual_page_are_generated_from_the_flags() -> anyhow::Result<()> {
    let dir = TestDir::new("operability-manual")?;
    let bash = run_flotilla(&["completions", "bash"], &[])
        .await?
        .expect_success()?;
    for word in [
        "coordinator",
        "agent",
        "submit",
        "quickstart",
        "--log-format",
    ] {
        assert!(bash.stdout.contains(word), "bash completions lack {word}");
    }
    let script = dir.join("flotilla.bash");
    std::fs::write(&script, &bash.stdout)?;
    let syntax = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()?;
    assert!(
        syntax.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    for shell in ["zsh", "fish"] {
        let out = run_flotilla(&["completions", shell], &[])
            .await?
            .expect_success()?;
        assert!(out.stdout.contains("submit"), "{shell}: {}", out.stdout);
    }
    let bad = run_flotilla(&["completions", "tcsh"], &[]).await?;
    assert_eq!(bad.code(), Some(2), "{bad}");

    let man = run_flotilla(&["man"], &[]).await?.expect_success()?;
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH OPTIONS",
        ".SH SUBCOMMANDS",
        ".SH \"EXIT STATUS\"",
        ".SH ENVIRONMENT",
    ] {
        assert!(man.stdout.contains(section), "no {section} in the page");
    }
    let page = dir.join("flotilla.1");
    std::fs::write(&page, &man.stdout)?;
    // Rendered as `man` would (without bold or underline), where groff is installed,
    // with every warning on.
    if let Some(groff) = crate::harness::find_in_path("groff") {
        let rendered = std::process::Command::new(groff)
            .args(["-man", "-Tutf8", "-ww", "-P-cbou"])
            .arg(&page)
            .output()?;
        let stderr = String::from_utf8_lossy(&rendered.stderr);
        assert!(
            rendered.status.success() && stderr.trim().is_empty(),
            "groff: {stderr}"
        );
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(
            text.contains("EXIT STATUS") && text.contains("FLOTILLA_LOG_FORMAT"),
            "{text}"
        );
    }
    // One page per command for a man directory.
    let pages = dir.join("man1");
    let pages_arg = pages.to_string_lossy().into_owned();
    run_flotilla(&["man", "--out-dir", &pages_arg], &[])
        .await?
        .expect_success()?;
    let submit = std::fs::read_to_string(pages.join("flotilla-plan-submit.1"))?;
    assert!(submit.contains("\\-\\-atomic"), "{submit}");
    Ok(())
}

/// A reader that stops reading (`flotilla ... | head -1`) ends the command quietly, exit 141
/// as a shell reports `ls` or `grep` ended by SIGPIPE, where it panicked printing to the
/// closed pipe (exit 101 and a backtrace).
#[test]
fn output_piped_into_a_reader_that_stops_ends_quietly() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(crate::harness::process::FLOTILLA_BIN)
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first)?;
    // the reader is dropped here: the rest (150 KB, past the pipe's buffer) meets a closed pipe
    assert!(first.starts_with("_flotilla"), "{first}");
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{:?}", out.status);
    // The manual page is shorter than a pipe's buffer: its reader is gone before it is
    // written (it printed "error: writing the manual page: Broken pipe", exit 3).
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = Command::new(crate::harness::process::FLOTILLA_BIN)
        .arg("man")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "man: {stderr}");
    assert_eq!(out.status.code(), Some(141), "man: {:?}", out.status);
    Ok(())
}
