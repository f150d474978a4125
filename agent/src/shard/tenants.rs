//! The shard's tenants: schemas matching a pattern, or the rows of the operator's query.
use std::collections::BTreeMap;

use flotilla_core::pb;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{AssertSqlSafe, Row};
use tracing::{instrument, warn};

use crate::config::AgentConfig;

/// How the agent finds the tenants of its shard.
#[derive(Debug, Clone)]
pub(crate) enum TenantSource {
    None,
    Pattern(String),
    Query(String),
}

impl TenantSource {
    pub fn from_config(config: &AgentConfig) -> TenantSource {
        match (&config.tenant_pattern, &config.tenant_query) {
            (Some(p), _) => TenantSource::Pattern(p.clone()),
            (None, Some(q)) => TenantSource::Query(q.clone()),
            (None, None) => TenantSource::None,
        }
    }
}

/// Lists the shard's tenants, sorted by name; invalid names are skipped with a warning.
#[instrument(skip_all, fields(shard = %shard))]
pub(crate) async fn discover_tenants(
    pool: &PgPool,
    shard: &str,
    source: &TenantSource,
) -> Result<Vec<pb::Tenant>, sqlx::Error> {
    let found: Vec<(String, Option<String>)> = match source {
        TenantSource::None => Vec::new(),
        TenantSource::Pattern(pattern) => sqlx::query_scalar::<_, String>(
            "SELECT nspname::text FROM pg_catalog.pg_namespace WHERE nspname LIKE $1 ORDER BY nspname",
        )
        .bind(pattern)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|name| (name, None))
        .collect(),
        // The operator's own query, in a READ ONLY transaction: it lists tenants, and one
        // that writes (a mistake, or several statements) fails instead. Simple-query results
        // come as text whatever their type, so a json/jsonb labels column reads as its text form.
        TenantSource::Query(query) => {
            let mut tx = pool.begin().await?;
            sqlx::query("SET TRANSACTION READ ONLY")
                .execute(&mut *tx)
                .await?;
            let rows = sqlx::raw_sql(AssertSqlSafe(query.as_str()))
                .fetch_all(&mut *tx)
                .await?;
            tx.rollback().await?;
            rows.iter()
                .filter_map(|row: &PgRow| {
                    let name: Option<String> = row.try_get_unchecked(0).ok()?;
                    let labels = if row.len() > 1 { row.try_get_unchecked(1).ok()? } else { None };
                    Some((name?, labels))
                })
                .collect()
        }
    };
    // A query's names are the operator's registry, not the catalog: a name with no schema
    // (a registry that says `Acme` of the schema `acme`: quoted names are case-sensitive)
    // would be a target whose every step fails late, with no schema to run in.
    let schemas: Option<std::collections::BTreeSet<String>> = match source {
        TenantSource::Query(_) => {
            let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
            Some(
                sqlx::query_scalar::<_, String>(
                    "SELECT nspname::text FROM pg_catalog.pg_namespace WHERE nspname = ANY ($1)",
                )
                .bind(&names)
                .fetch_all(pool)
                .await?
                .into_iter()
                .collect(),
            )
        }
        _ => None,
    };
    let mut tenants = BTreeMap::new();
    for (name, labels) in found {
        if let Err(reason) = flotilla_core::validate_tenant_name(&name) {
            warn!(schema = %name.escape_debug(), %reason, "skipping schema: not a valid tenant name");
            continue;
        }
        if schemas.as_ref().is_some_and(|s| !s.contains(&name)) {
            warn!(tenant = %name.escape_debug(), "skipping tenant: the tenant query names it, but the shard has no schema of that name (names are case-sensitive)");
            continue;
        }
        let labels = match parse_tenant_labels(labels.as_deref().unwrap_or("")) {
            Ok((labels, reserved)) => {
                if !reserved.is_empty() {
                    warn!(tenant = %name.escape_debug(), keys = %reserved.join(", "), "a tenant's labels name a key every target has of itself (its shard's or tenant's name): left out, the tenant kept");
                }
                labels
            }
            Err(reason) => {
                warn!(schema = %name, %reason, "skipping tenant: its labels do not parse");
                continue;
            }
        };
        tenants.insert(
            name.clone(),
            pb::Tenant {
                name,
                labels: labels.into_iter().collect(),
                schema_changed: false,
                renamed_from: String::new(),
            },
        );
    }
    Ok(tenants.into_values().collect())
}

/// Tenant labels as the tenant query gives them: `k=v,k2=v2`, or a json object; and the
/// reserved keys it gave (`shard`, `tenant`), left out: the tenant is kept, selected by its
/// own shard and name (a label `shard=b` made a selector's `shard in (b)` take it).
fn parse_tenant_labels(raw: &str) -> Result<(BTreeMap<String, String>, Vec<String>), String> {
    let mut labels = BTreeMap::new();
    let mut reserved = Vec::new();
    for (k, v) in tenant_label_pairs(raw)? {
        if flotilla_core::RESERVED_LABEL_KEYS.contains(&k.as_str()) {
            reserved.push(k);
        } else if labels.insert(k.clone(), v).is_some() {
            return Err(format!("label key `{k}` is given twice"));
        }
    }
    Ok((labels, reserved))
}

fn tenant_label_pairs(raw: &str) -> Result<Vec<(String, String)>, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    if raw.starts_with('{') {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(raw).map_err(|e| format!("labels are not a json object: {e}"))?;
        let text = map
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>();
        // the same key rules as every other label
        for kv in &text {
            if kv.contains(',') {
                return Err(format!("label `{kv}` holds a comma"));
            }
        }
        return flotilla_core::label_pairs(&text.join(","));
    }
    flotilla_core::label_pairs(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_as_text() {
        let (l, reserved) = parse_tenant_labels(" tier=gold, region=eu ").unwrap();
        assert_eq!(l.get("tier").map(String::as_str), Some("gold"));
        assert_eq!(l.len(), 2);
        assert!(reserved.is_empty());
        assert!(parse_tenant_labels("").unwrap().0.is_empty());
        assert!(parse_tenant_labels("novalue").is_err());
        let e = parse_tenant_labels("tier=gold,tier=free").unwrap_err();
        assert!(e.contains("`tier` is given twice"), "{e}");
    }

    /// A tenant's label named `shard` or `tenant` is left out, the tenant kept: selectors'
    /// `shard`/`tenant` name its own (a label `shard=b` on a tenant of shard a made
    /// `shard in (b)` take it).
    #[test]
    fn reserved_label_keys_are_left_out_and_the_tenant_kept() {
        let (l, reserved) =
            parse_tenant_labels("industry=auto,shard=shard_b,tenant=other,tier=pro").unwrap();
        assert_eq!(reserved, ["shard", "tenant"]);
        assert_eq!(l.keys().collect::<Vec<_>>(), ["industry", "tier"]);
        let (l, reserved) = parse_tenant_labels(r#"{"shard": "b", "tier": "pro"}"#).unwrap();
        assert_eq!(reserved, ["shard"]);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn labels_as_json() {
        let (l, _) =
            parse_tenant_labels(r#"{"tier": "gold", "size": 3, "beta": true, "gone": null}"#)
                .unwrap();
        assert_eq!(l.get("tier").map(String::as_str), Some("gold"));
        assert_eq!(l.get("size").map(String::as_str), Some("3"));
        assert_eq!(l.get("beta").map(String::as_str), Some("true"));
        assert!(!l.contains_key("gone"));
        assert!(parse_tenant_labels("{not json").is_err());
        assert!(parse_tenant_labels(r#"{"bad key": "x"}"#).is_err());
    }
}
