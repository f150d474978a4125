//! The seed's naming standards, an optional rule set (`--rules naming`): a migration id is
//! `{version}_{description}` (`001_initial_schema`, `2025.01.31_160000_add_rating`), and a
//! native migration says what it does in its description (a dbmate file's name is its).

use super::rules::Out;
use super::{NAMING_DESCRIPTION, NAMING_ID};
use crate::Migration;

pub(super) fn check(m: &Migration, out: &mut Out) {
    if !standard_id(m.id.as_str()) {
        out.push(
            NAMING_ID,
            "migration.toml",
            0,
            format!("id `{}` is not <version>_<description>", m.id),
            "name it a numeric version (digits, dots and underscores between digit groups) then a lower-case snake_case description, e.g. 2025.01.31_160000_add_rating",
        );
    }
    // A dbmate file has no description but its name (`<version>_<description>.sql`).
    let dbmate = m.source.ends_with(".sql");
    if m.description.trim().is_empty() && !dbmate {
        out.push(
            NAMING_DESCRIPTION,
            "migration.toml",
            0,
            "the migration has no description".to_string(),
            "say what it changes and why in `description` of migration.toml",
        );
    }
}

/// `<version>_<snake_case>`: a version of digit groups joined by `.` or `_`, then a
/// description of lower-case words joined by single underscores.
fn standard_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    let mut i = 0;
    // The version: digits, and `.`/`_` only between digits.
    while i < bytes.len() {
        let b = bytes[i];
        let joins = (b == b'.' || b == b'_')
            && i > 0
            && bytes[i - 1].is_ascii_digit()
            && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
        if b.is_ascii_digit() || joins {
            i += 1;
        } else {
            break;
        }
    }
    if i == 0 || bytes.get(i) != Some(&b'_') {
        return false;
    }
    let description = &id[i + 1..];
    !description.is_empty()
        && description.split('_').all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

#[cfg(test)]
mod tests {
    use super::standard_id;

    #[test]
    fn ids_follow_version_then_snake_case() {
        for good in [
            "001_initial_schema",
            "2025.01.31_160000_hs_satisfaction_tracking",
            "20250131160000_add_column",
            "3_x2",
        ] {
            assert!(standard_id(good), "{good}");
        }
        for bad in [
            "initial_schema",
            "001",
            "001_",
            "001_AddColumn",
            "001_add__column",
            "001-add-column",
            "v1_add",
            "001_add_column_",
        ] {
            assert!(!standard_id(bad), "{bad}");
        }
    }
}
