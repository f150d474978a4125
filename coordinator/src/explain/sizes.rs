//! The dry run's reads on the shards: one request per shard naming every relation its
//! targets' migrations touch, and the answers folded per migration into min / median / max
//! over its targets (and each target's own figures).
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_core::pb;

use super::statements::Parsed;
use crate::admission::unknown_reason;
use crate::planner::Expansion;
use crate::service::Coordinator;

/// How long the dry run waits for a shard's reads: a shard that has not answered by then is
/// named unknown, and the rest is shown.
const READ_DEADLINE: Duration = Duration::from_secs(10);
/// Each target's reads on the agent (a few catalog lookups).
const TARGET_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agents read: (shard, tenant, relation) -> the probe.
pub(super) type Probes = BTreeMap<(String, String, String), pb::RelationProbe>;

/// Per shard that can be asked: its targets (tenant names, "" = the shard) and the relations
/// named by the migrations that have steps there.
pub(super) fn asks(
    expansion: &Expansion,
    targets_of: &[Vec<usize>],
    parsed: &[Parsed],
    unknown: &BTreeMap<String, String>,
) -> BTreeMap<String, pb::ExplainRequest> {
    let mut per_shard: BTreeMap<String, (BTreeSet<String>, Vec<String>)> = BTreeMap::new();
    for (m, targets) in targets_of.iter().enumerate() {
        if parsed[m].relations.is_empty() {
            continue;
        }
        for &t in targets {
            let target = &expansion.targets[t];
            if unknown.contains_key(&target.shard) {
                continue;
            }
            let (tenants, relations) = per_shard.entry(target.shard.clone()).or_default();
            tenants.insert(target.tenant.clone());
            for r in &parsed[m].relations {
                if !relations.contains(r) {
                    relations.push(r.clone());
                }
            }
        }
    }
    per_shard
        .into_iter()
        .map(|(shard, (tenants, relations))| {
            (
                shard,
                pb::ExplainRequest {
                    request_id: 0,
                    relations,
                    tenants: tenants.into_iter().collect(),
                    timeout_ms: TARGET_TIMEOUT.as_millis() as u64,
                },
            )
        })
        .collect()
}

impl Coordinator {
    /// Asks every shard in parallel; a shard that cannot answer goes into `unknown`.
    pub(super) async fn read_sizes(
        &self,
        asks: BTreeMap<String, pb::ExplainRequest>,
        unknown: &mut BTreeMap<String, String>,
    ) -> Probes {
        let replies = futures::future::join_all(asks.into_iter().map(|(shard, request)| async {
            let r = self
                .inner
                .fleet
                .explain(&shard, request, READ_DEADLINE)
                .await;
            (shard, r)
        }))
        .await;
        let mut probes = Probes::new();
        for (shard, reply) in replies {
            match reply {
                Ok(reply) => {
                    for p in reply.relations {
                        probes.insert((shard.clone(), p.tenant.clone(), p.relation.clone()), p);
                    }
                }
                Err(e) => {
                    tracing::warn!(shard = %shard, error = %e, "a shard did not answer the dry run");
                    unknown.insert(shard, unknown_reason(e));
                }
            }
        }
        probes
    }
}

/// One relation over one migration's targets.
pub(super) fn aggregate(
    relation: &str,
    targets: &[usize],
    expansion: &Expansion,
    probes: &Probes,
    unknown: &BTreeMap<String, String>,
) -> pb::RelationSizes {
    let mut out = pb::RelationSizes {
        relation: relation.to_string(),
        ..Default::default()
    };
    let mut bytes = Vec::new();
    let mut rows = Vec::new();
    for &t in targets {
        let target = &expansion.targets[t];
        let key = (
            target.shard.clone(),
            target.tenant.clone(),
            relation.to_string(),
        );
        let mut size = pb::TargetSize {
            target: target.to_string(),
            ..Default::default()
        };
        match probes.get(&key) {
            Some(p) if p.error.is_empty() && p.exists => {
                out.present += 1;
                size.state = "present".into();
                size.bytes = p.bytes;
                size.rows = p.rows;
                bytes.push(p.bytes);
                if p.rows >= 0 {
                    rows.push(p.rows);
                }
            }
            Some(p) if p.error.is_empty() => {
                out.missing += 1;
                size.state = "missing".into();
            }
            other => {
                out.unknown += 1;
                size.state = "unknown".into();
                size.error = match other {
                    Some(p) => p.error.clone(),
                    None => unknown
                        .get(&target.shard)
                        .cloned()
                        .unwrap_or_else(|| "not reported".into()),
                };
            }
        }
        out.per_target.push(size);
    }
    (out.min_bytes, out.median_bytes, out.max_bytes) = spread(&mut bytes).unwrap_or((0, 0, 0));
    (out.min_rows, out.median_rows, out.max_rows) = spread(&mut rows).unwrap_or((-1, -1, -1));
    out
}

/// Min, median (the lower one of an even count) and max.
fn spread(values: &mut [i64]) -> Option<(i64, i64, i64)> {
    values.sort_unstable();
    let n = values.len();
    (n > 0).then(|| (values[0], values[(n - 1) / 2], values[n - 1]))
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn spread_is_min_lower_median_max() {
        assert_eq!(spread(&mut []), None);
        assert_eq!(spread(&mut [5]), Some((5, 5, 5)));
        assert_eq!(spread(&mut [9, 1, 4, 7]), Some((1, 4, 9)));
        assert_eq!(spread(&mut [3, 1, 2]), Some((1, 2, 3)));
    }
}
