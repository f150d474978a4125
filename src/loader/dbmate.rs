//! dbmate's migration files, read unchanged: `<version>_<name>.sql` holding a
//! `-- migrate:up` section and, optionally, a `-- migrate:down` section. A marker may
//! carry options (`-- migrate:up transaction:false`).
use std::path::Path;

use flotilla_core::MigrationId;
use flotilla_core::pb;

use super::error::{LoadError, read_text};
use super::parts::{Parts, statements};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

impl Direction {
    fn marker(self) -> &'static str {
        match self {
            Direction::Up => "-- migrate:up",
            Direction::Down => "-- migrate:down",
        }
    }
}

#[derive(Debug)]
struct Section {
    /// Line of the marker (1-based).
    marker_line: usize,
    /// Byte range of the section's text: from the line after the marker to the next marker.
    start: usize,
    end: usize,
    /// `transaction:` on the marker line, when given.
    transaction: Option<bool>,
}

/// Reads the dbmate migration file at `path`, whose file name is `name`.
pub(super) fn read(path: &Path, name: &str) -> Result<pb::Migration, LoadError> {
    let stem = &name[..name.len() - ".sql".len()];
    let digits = stem.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || !(stem.len() == digits || stem.as_bytes()[digits] == b'_') {
        return Err(LoadError::invalid(
            path,
            "not a migration file name: expected dbmate's <version>_<name>.sql with a numeric \
             version (e.g. 20250131160000_add_column.sql), golang-migrate's \
             <version>_<name>.up.sql / .down.sql, or Flyway's V<version>__<description>.sql / \
             U<version>__<description>.sql",
        ));
    }
    if let Err(e) = MigrationId::parse(stem) {
        return Err(LoadError::invalid(
            path,
            format!("file name is not a migration id: {e}"),
        ));
    }
    let text = read_text(path)?;
    let (up, down) = sections(&text).map_err(|(line, msg)| LoadError::at_line(path, line, msg))?;

    let up_text = &text[up.start..up.end];
    if statements(path, up_text, up.marker_line + 1)?.is_empty() {
        return Err(LoadError::at_line(
            path,
            up.marker_line,
            "the `-- migrate:up` section holds no SQL statements",
        ));
    }
    let down_text = match &down {
        Some(d) => {
            let t = &text[d.start..d.end];
            statements(path, t, d.marker_line + 1)?;
            t.trim()
        }
        None => "",
    };
    // One transaction mode covers both directions: if either runs outside a
    // transaction for dbmate, it does for Flotilla too.
    let options = [Some(&up), down.as_ref()];
    let flags = options.iter().flatten().filter_map(|s| s.transaction);
    let tx_mode = flags.fold(pb::TxMode::Unspecified, |mode, t| match (mode, t) {
        (_, false) | (pb::TxMode::NonTransactional, _) => pb::TxMode::NonTransactional,
        _ => pb::TxMode::Transactional,
    });

    let mut m = Parts {
        id: stem.to_string(),
        up_sql: up_text.trim().to_string(),
        down_sql: down_text.to_string(),
        verify_sql: String::new(),
        source: path.display().to_string(),
    }
    .into_migration();
    m.tx_mode = tx_mode as i32;
    m.lint_ignore = super::parts::lint_ignores(&text)
        .map_err(|(line, msg)| LoadError::at_line(path, line, msg))?;
    Ok(m)
}

/// The up section and, if present, the down section; an error is `(line, message)`.
fn sections(text: &str) -> Result<(Section, Option<Section>), (usize, String)> {
    let mut up: Option<Section> = None;
    let mut down: Option<Section> = None;
    // The first line of SQL before `-- migrate:up`, which dbmate would never run.
    let mut stray: Option<usize> = None;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let n = i + 1;
        let line_start = offset;
        offset += line.len();
        let Some(marker) = marker(line) else {
            let t = line.trim();
            if up.is_none() && stray.is_none() && !t.is_empty() && !t.starts_with("--") {
                stray = Some(n);
            }
            continue;
        };
        let (direction, transaction) = marker.map_err(|m| (n, m))?;
        // The previous section ends where this marker's line starts.
        for s in [&mut up, &mut down].into_iter().flatten() {
            if s.end == usize::MAX {
                s.end = line_start;
            }
        }
        let section = Section {
            marker_line: n,
            start: offset,
            end: usize::MAX,
            transaction,
        };
        let slot = match direction {
            Direction::Up => &mut up,
            Direction::Down if up.is_none() => {
                return Err((n, "`-- migrate:down` comes before `-- migrate:up`".into()));
            }
            Direction::Down => &mut down,
        };
        if let Some(first) = slot {
            return Err((
                n,
                format!(
                    "a second `{}` (the first is on line {})",
                    direction.marker(),
                    first.marker_line
                ),
            ));
        }
        *slot = Some(section);
    }
    for s in [&mut up, &mut down].into_iter().flatten() {
        if s.end == usize::MAX {
            s.end = text.len();
        }
    }
    let Some(up) = up else {
        return Err((
            1,
            "no `-- migrate:up` line: a dbmate migration starts its SQL with `-- migrate:up` \
             (and its undo with `-- migrate:down`)"
                .into(),
        ));
    };
    if let Some(n) = stray {
        return Err((
            n,
            "SQL before `-- migrate:up`: dbmate runs only what is inside the \
             `-- migrate:up` and `-- migrate:down` sections"
                .into(),
        ));
    }
    Ok((up, down))
}

/// Whether `line` is a dbmate marker: `None` if not; an error for a `-- migrate:` line that
/// dbmate would not understand (a typo there would otherwise run the down SQL as up).
fn marker(line: &str) -> Option<Result<(Direction, Option<bool>), String>> {
    let t = line.trim_end();
    let rest = t
        .strip_prefix("--")?
        .trim_start()
        .strip_prefix("migrate:")?;
    let (word, options) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let direction = match word {
        "up" => Direction::Up,
        "down" => Direction::Down,
        _ => {
            return Some(Err(format!(
                "unknown dbmate marker `{t}`: expected `-- migrate:up` or `-- migrate:down`"
            )));
        }
    };
    let mut transaction = None;
    for option in options.split_whitespace() {
        transaction = Some(match option {
            "transaction:false" => false,
            "transaction:true" => true,
            other => {
                return Some(Err(format!(
                    "unknown option `{other}` on `{}`: Flotilla understands \
                     transaction:true and transaction:false",
                    direction.marker()
                )));
            }
        });
    }
    Some(Ok((direction, transaction)))
}
