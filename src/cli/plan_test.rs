//! `flotilla plan test PATH --dsn ...`: the plan rehearsed on a scratch database by the
//! agent's own code (`flotilla_agent::rehearsal`), no coordinator involved.
use std::collections::HashMap;
use std::path::Path;

use flotilla_agent::rehearsal::{self, MigrationTest, Outcome, RehearsalConfig, RehearsalError};
use serde_json::json;

use super::{EXIT_BAD_INPUT, EXIT_OK, EXIT_PLAN_FAILED, EXIT_UNAVAILABLE, Output, TestArgs};
use crate::loader::{self, Overrides};

pub async fn run(args: TestArgs) -> u8 {
    if let Err(e) = super::daemons::check_dsn(&args.dsn) {
        eprintln!("error: {e}");
        return EXIT_BAD_INPUT;
    }
    let overrides = Overrides {
        scope: args.scope.clone(),
        ..Default::default()
    };
    let raw = match loader::load(&args.path, &overrides) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let spec = match flotilla_core::PlanSpec::try_from(raw) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}: {e}", args.path.display());
            return EXIT_BAD_INPUT;
        }
    };
    let mut tests = HashMap::new();
    for m in &spec.migrations {
        match migration_test(Path::new(&m.source)) {
            Ok(Some(t)) => {
                tests.insert(m.id.to_string(), t);
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_BAD_INPUT;
            }
        }
    }
    let password = match &args.password_file {
        Some(path) => match flotilla_core::credential_files::read_password("--password-file", path)
        {
            Ok(password) => {
                if let Some(w) =
                    flotilla_core::credential_files::exposure_warning("--password-file", path)
                {
                    eprintln!("warning: {w}");
                }
                Some(password)
            }
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_BAD_INPUT;
            }
        },
        None => std::env::var("FLOTILLA_SHARD_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty()),
    };
    let seed = match &args.seed {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: --seed {}: {e}", path.display());
                return EXIT_BAD_INPUT;
            }
        },
        None => None,
    };
    if let Some(t) = &args.tenant
        && let Err(e) = flotilla_core::validate_tenant_name(t)
    {
        eprintln!("error: --tenant: {e}");
        return EXIT_BAD_INPUT;
    }
    let config = RehearsalConfig {
        dsn: args.dsn.clone(),
        password,
        tenant: args.tenant.clone(),
        seed,
    };
    match rehearsal::rehearse(&config, &spec, &tests).await {
        Ok(outcomes) => report(&outcomes, spec.migrations.len(), args.output),
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                RehearsalError::Connect(_) => EXIT_UNAVAILABLE,
                RehearsalError::Dsn(_)
                | RehearsalError::NotScratch
                | RehearsalError::NoTenant(_) => EXIT_BAD_INPUT,
                // the seed, or the plan's own SQL as a whole, did not run
                RehearsalError::Setup { .. } => EXIT_PLAN_FAILED,
            }
        }
    }
}

/// A migration's `[test]`, from its directory's migration.toml (dbmate files have none).
pub(super) fn migration_test(dir: &Path) -> Result<Option<MigrationTest>, String> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let Some(t) = loader::read_test(dir).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    if t.query.trim().is_empty() {
        return Err(format!("{}: [test] has an empty query", dir.display()));
    }
    // SQL PostgreSQL's parser refuses is named here, by its key and line, before anything
    // is created in the scratch database
    for (key, sql) in [("setup", &t.setup), ("query", &t.query)] {
        if let Err(e) = flotilla_core::lint::analyze(sql) {
            return Err(format!(
                "{}: [test] {key}: {e}",
                dir.join("migration.toml").display()
            ));
        }
    }
    let expect = t
        .expected()
        .map_err(|e| format!("{}: {e}", dir.join("migration.toml").display()))?;
    Ok(Some(MigrationTest {
        setup: t.setup,
        query: t.query,
        expect,
    }))
}

fn report(outcomes: &[Outcome], total: usize, output: Output) -> u8 {
    let failed = outcomes.iter().find(|o| o.failure.is_some());
    if output == Output::Json {
        let v = json!({
            "passed": failed.is_none(),
            "migrations": outcomes.iter().map(|o| json!({
                "id": o.migration,
                "target": o.target,
                "passed": o.passed,
                "failure": o.failure,
            })).collect::<Vec<_>>(),
            "not_run": total - outcomes.len(),
        });
        println!("{v}");
    } else {
        for o in outcomes {
            let target = if o.target.is_empty() {
                "database".to_string()
            } else {
                format!("tenant {}", o.target)
            };
            match &o.failure {
                None => println!("ok    {} ({target}): {}", o.migration, o.passed.join(", ")),
                Some(f) => println!("FAIL  {} ({target}): {f}", o.migration),
            }
        }
        if total > outcomes.len() {
            println!("{} migration(s) not run", total - outcomes.len());
        }
    }
    match failed {
        None => EXIT_OK,
        Some(o) => {
            eprintln!(
                "error: migration `{}`: {}",
                o.migration,
                o.failure.as_deref().unwrap_or_default()
            );
            EXIT_PLAN_FAILED
        }
    }
}
