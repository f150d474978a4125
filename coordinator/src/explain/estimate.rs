//! The dry run's estimate: from the control store's record of past runs. A step is guessed
//! from the recorded durations of the same migration (run before in another environment or
//! on other targets), else of similar ones (the same statement kinds in the same order),
//! else of migrations of the same kind; a data change from its table's row estimate and the
//! rates recorded for data changes (capped by its own rate limit). No record: "no history".
use std::collections::HashMap;

use flotilla_core::{Migration, pb};
use prost::Message;

use super::statements::{self, Parsed};
use crate::error::CoordinatorError;
use crate::store::Store;

/// How many recorded steps and plans are looked at (the most recent).
const STEPS: i64 = 5000;
const PLANS: usize = 50;
const RATES: i64 = 1000;

/// Recorded durations (ms) and rates (rows/s), grouped the ways a migration can be similar.
#[derive(Default)]
pub(super) struct History {
    by_id: HashMap<String, Vec<u64>>,
    by_shape: HashMap<String, Vec<u64>>,
    by_kind: HashMap<String, Vec<u64>>,
    rates_by_id: HashMap<String, Vec<f64>>,
    rates: Vec<f64>,
}

/// A guess for one step of a migration.
pub(super) struct Guess {
    pub step_ms: Option<u64>,
    pub basis: String,
    /// A data change's step on its largest target: the migration takes no less, however
    /// many targets run at once (tenants' sizes are skewed: the median's figure was a
    /// quarter of a real run, whose largest tenant held four times the median's rows).
    pub slowest_ms: Option<u64>,
}

impl History {
    pub async fn load(store: &Store) -> Result<History, CoordinatorError> {
        let mut h = History::default();
        let steps = store.step_durations(STEPS).await?;
        // What the recorded steps' migrations were: their kind and statement shape.
        let mut described: HashMap<(String, String), (String, String)> = HashMap::new();
        let mut plans_read: Vec<String> = Vec::new();
        for s in &steps {
            if plans_read.contains(&s.plan_id) || plans_read.len() >= PLANS {
                continue;
            }
            plans_read.push(s.plan_id.clone());
            let Some(row) = store.plan(&s.plan_id).await? else {
                continue;
            };
            let Some(raw) = hex::decode(&row.spec_hex)
                .ok()
                .and_then(|b| pb::PlanSpec::decode(b.as_slice()).ok())
            else {
                continue;
            };
            for m in raw.migrations {
                let id = m.id.clone();
                let kind = m.kind.clone();
                let shape = Migration::try_from(m)
                    .map(|m| statements::parse(&m).shape())
                    .unwrap_or_default();
                described.insert((s.plan_id.clone(), id), (kind, shape));
            }
        }
        for s in steps {
            let ms = s.duration_ms.max(0) as u64;
            if let Some((kind, shape)) = described.get(&(s.plan_id.clone(), s.migration_id.clone()))
            {
                if has_kinds(shape) {
                    h.by_shape.entry(shape.clone()).or_default().push(ms);
                }
                if !kind.is_empty() {
                    h.by_kind.entry(kind.clone()).or_default().push(ms);
                }
            }
            h.by_id.entry(s.migration_id).or_default().push(ms);
        }
        for p in store.data_rates(RATES).await? {
            if p.rows_per_second > 0.0 {
                h.rates_by_id
                    .entry(p.migration_id.clone())
                    .or_default()
                    .push(p.rows_per_second);
                h.rates.push(p.rows_per_second);
            }
        }
        Ok(h)
    }

    /// One step of `m` on a typical target.
    pub fn estimate(
        &self,
        m: &Migration,
        parsed: &Parsed,
        relations: &[pb::RelationSizes],
    ) -> Guess {
        if let Some(d) = &m.data {
            let table = d.table_text();
            let sizes = relations.iter().find(|r| r.relation == table);
            let rows = sizes.map(|r| r.median_rows).filter(|&r| r >= 0);
            let max_rows = sizes.map(|r| r.max_rows).filter(|&r| r >= 0);
            let recorded = self
                .rates_by_id
                .get(m.id.as_str())
                .map(|r| (median_f(r), "recorded for this migration"))
                .or_else(|| {
                    (!self.rates.is_empty())
                        .then(|| (median_f(&self.rates), "recorded for data changes"))
                });
            let limit = (d.rows_per_second > 0).then_some(d.rows_per_second as f64);
            let rate = match (recorded, limit) {
                (Some((r, _)), Some(l)) if l < r => Some((l, "its rate limit".to_string())),
                (Some((r, why)), _) => Some((r, format!("{r:.0} rows/s {why}"))),
                (None, Some(l)) => Some((l, "its rate limit (no recorded rate)".to_string())),
                (None, None) => None,
            };
            if let (Some(rows), Some((rate, why))) = (rows, rate) {
                let ms = (rows as f64 / rate * 1000.0).ceil() as u64;
                let slowest = max_rows
                    .filter(|&max| max > rows)
                    .map(|max| (max, (max as f64 / rate * 1000.0).ceil() as u64));
                let mut basis = format!("{rows} rows (median estimate) at {rate:.0} rows/s: {why}");
                if let Some((max, _)) = slowest {
                    basis.push_str(&format!(
                        "; its largest target, {max} rows, sets how long it takes at least"
                    ));
                }
                return Guess {
                    step_ms: Some(ms),
                    basis,
                    slowest_ms: slowest.map(|(_, ms)| ms),
                };
            }
        }
        let shape = parsed.shape();
        let found = self
            .by_id
            .get(m.id.as_str())
            .map(|d| (d, "of this migration".to_string()))
            .or_else(|| {
                has_kinds(&shape)
                    .then(|| self.by_shape.get(&shape))
                    .flatten()
                    .map(|d| (d, format!("of similar migrations ({shape})")))
            })
            .or_else(|| {
                self.by_kind
                    .get(&m.kind)
                    .filter(|_| !m.kind.is_empty())
                    .map(|d| (d, format!("of `{}` migrations", m.kind)))
            });
        match found {
            Some((durations, what)) => Guess {
                step_ms: Some(median(durations)),
                basis: format!("median of {} recorded steps {what}", durations.len()),
                slowest_ms: None,
            },
            None => Guess {
                step_ms: None,
                basis: "no history".into(),
                slowest_ms: None,
            },
        }
    }
}

/// The plan's estimate, summed over its migrations.
#[derive(Default)]
pub(super) struct Totals {
    ms: u64,
    known: usize,
    unknown: usize,
}

impl Totals {
    pub fn add(&mut self, known: bool, ms: u64, steps_to_run: u32) {
        if known {
            self.ms += ms;
            self.known += 1;
        } else if steps_to_run > 0 {
            self.unknown += 1;
        }
    }

    /// The estimate and how it was reached. Migrations are counted one after another (a
    /// plan's parallel groups may overlap them: the figure is an upper bound for those).
    pub fn finish(self, max_parallel: u32) -> (u64, String) {
        if self.known == 0 {
            return (0, "no history".into());
        }
        let mut basis =
            format!("sum over migrations of their steps, {max_parallel} targets at once");
        if self.unknown > 0 {
            basis.push_str(&format!(
                "; {} migration(s) with no history not counted",
                self.unknown
            ));
        }
        (self.ms, basis)
    }
}

/// A shape worth comparing: the statements' kinds are known.
fn has_kinds(shape: &str) -> bool {
    shape.split(',').any(|k| !k.is_empty())
}

fn median(values: &[u64]) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

fn median_f(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_total_says_no_history_when_nothing_was_recorded() {
        let mut t = Totals::default();
        t.add(false, 0, 3);
        assert_eq!(t.finish(8), (0, "no history".to_string()));
        let mut t = Totals::default();
        t.add(true, 1200, 4);
        t.add(false, 0, 2);
        let (ms, basis) = t.finish(8);
        assert_eq!(ms, 1200);
        assert!(basis.contains("1 migration(s) with no history"), "{basis}");
    }

    fn data_migration(rows_per_second: u64) -> Migration {
        Migration::try_from(pb::Migration {
            id: "002_fill".into(),
            kind: "data".into(),
            data: Some(pb::DataChange {
                table: "work_orders".into(),
                key: "id".into(),
                batch_sql: "UPDATE work_orders SET note = 'x' WHERE id > $1 AND id <= $2".into(),
                rows_per_second,
                ..Default::default()
            }),
            ..Default::default()
        })
        .expect("a valid data migration")
    }

    fn table(median_rows: i64) -> Vec<pb::RelationSizes> {
        vec![pb::RelationSizes {
            relation: "work_orders".into(),
            present: 3,
            median_rows,
            ..Default::default()
        }]
    }

    #[test]
    fn a_data_change_is_its_rows_at_the_recorded_rate_capped_by_its_limit() {
        let mut h = History::default();
        let parsed = Parsed::default();
        let m = data_migration(0);
        let g = h.estimate(&m, &parsed, &table(10_000));
        assert_eq!(g.step_ms, None);
        assert_eq!(g.basis, "no history");

        h.rates = vec![500.0, 1000.0, 2000.0];
        let g = h.estimate(&m, &parsed, &table(10_000));
        assert_eq!(g.step_ms, Some(10_000), "{}", g.basis);
        assert!(g.basis.contains("recorded for data changes"), "{}", g.basis);

        // its own limit is slower than what was recorded: the limit decides
        let g = h.estimate(&data_migration(100), &parsed, &table(10_000));
        assert_eq!(g.step_ms, Some(100_000), "{}", g.basis);
        assert!(g.basis.contains("its rate limit"), "{}", g.basis);

        // skewed tenants: the largest target's rows at the same rate (the recorded 1,000
        // rows/s, below its limit) bound the migration
        let skewed = vec![pb::RelationSizes {
            relation: "work_orders".into(),
            present: 5,
            median_rows: 45_000,
            max_rows: 200_000,
            ..Default::default()
        }];
        let g = h.estimate(&data_migration(4000), &parsed, &skewed);
        assert_eq!(
            (g.step_ms, g.slowest_ms),
            (Some(45_000), Some(200_000)),
            "{}",
            g.basis
        );
        assert!(
            g.basis
                .contains("its largest target, 200000 rows, sets how long it takes at least"),
            "{}",
            g.basis
        );

        // no row estimate (never analyzed): recorded step durations, if any
        let g = h.estimate(&m, &parsed, &table(-1));
        assert_eq!(g.basis, "no history");
        h.by_id.insert("002_fill".into(), vec![40, 60, 50]);
        let g = h.estimate(&m, &parsed, &table(-1));
        assert_eq!(g.step_ms, Some(50));
        assert_eq!(g.basis, "median of 3 recorded steps of this migration");
    }

    #[test]
    fn medians_take_the_lower_middle() {
        assert_eq!(median(&[30, 10, 20, 40]), 20);
        assert_eq!(median_f(&[3.0, 1.0, 2.0]), 2.0);
    }
}
