//! Which wave each of a plan's targets belongs to, decided once at submit and stored with
//! the plan's steps. Shares and counts take from the targets no earlier wave took, in an
//! order that is the same for the same plan and fleet (re-submitting picks the same
//! targets) and spread across shards (a 5% canary is not one shard's first tenants).
use std::collections::BTreeMap;

use flotilla_core::waves::Take;
use flotilla_core::{PlanSpec, Target};
use sha2::{Digest, Sha256};

use crate::error::{Refusal, some_of};
use crate::planner::Expansion;

/// The wave of each target (index into the plan's waves; 0 for a plan without waves).
pub(super) fn assign(spec: &PlanSpec, expansion: &Expansion) -> Result<Vec<usize>, Refusal> {
    let waves = &spec.rollout.waves;
    let n = expansion.targets.len();
    if waves.is_empty() {
        return Ok(vec![0; n]);
    }
    let keys = shuffle_keys(&spec.name, &expansion.targets);
    let mut wave_of: Vec<Option<usize>> = vec![None; n];
    for (w, wave) in waves.iter().enumerate() {
        let untaken: Vec<usize> = (0..n).filter(|&t| wave_of[t].is_none()).collect();
        let left = spread(&untaken, &expansion.targets, &keys);
        let taken: Vec<usize> = match &wave.take {
            Take::Selector(selector) => {
                let matching: Vec<usize> = (0..n)
                    .filter(|&t| selector.matches(&expansion.labels[t]))
                    .collect();
                // Two selectors naming one target is a mistake in the plan; a target an
                // earlier share or count happened to take is simply taken.
                let by_selector = |t: usize| {
                    wave_of[t].is_some_and(|w| matches!(waves[w].take, Take::Selector(_)))
                };
                if let Some(&t) = matching.iter().find(|&&t| by_selector(t)) {
                    let earlier = &waves[wave_of[t].expect("taken")].name;
                    let both: Vec<String> = matching
                        .iter()
                        .filter(|&&x| by_selector(x))
                        .map(|&x| expansion.targets[x].to_string())
                        .collect();
                    return Err(Refusal::WavesOverlap {
                        first: earlier.clone(),
                        second: wave.name.clone(),
                        targets: some_of(&both, 3),
                    });
                }
                matching
                    .into_iter()
                    .filter(|&t| wave_of[t].is_none())
                    .collect()
            }
            Take::Percent(p) => {
                // p * n / 100 (not p / 100 * n): 7% of 100 is 7, not 7.000000000000001 -> 8
                let k = (p * left.len() as f64 / 100.0 - 1e-9).ceil().max(0.0) as usize;
                left.into_iter().take(k).collect()
            }
            Take::Count(c) => left.into_iter().take(*c as usize).collect(),
            Take::Rest => left,
        };
        if taken.is_empty() && !wave.optional {
            return Err(Refusal::EmptyWave {
                wave: wave.name.clone(),
            });
        }
        for t in taken {
            wave_of[t] = Some(w);
        }
    }
    let unwaved: Vec<String> = (0..n)
        .filter(|&t| wave_of[t].is_none())
        .map(|t| expansion.targets[t].to_string())
        .collect();
    if !unwaved.is_empty() {
        return Err(Refusal::Unwaved {
            count: unwaved.len(),
            targets: some_of(&unwaved, 3),
        });
    }
    let mut wave_of: Vec<usize> = wave_of
        .into_iter()
        .map(|w| w.expect("every target"))
        .collect();
    pull_dependencies_forward(expansion, &mut wave_of);
    Ok(wave_of)
}

/// A step may wait for a step of another target (a tenant's step on its shard's, say a
/// `CREATE EXTENSION`): that target runs in the dependent's wave or before it, or the
/// dependent would wait for a wave that has not started.
fn pull_dependencies_forward(expansion: &Expansion, wave_of: &mut [usize]) {
    loop {
        let mut moved = false;
        for s in &expansion.steps {
            for &d in &s.deps {
                let (from, to) = (expansion.steps[d].target, s.target);
                if wave_of[from] > wave_of[to] {
                    wave_of[from] = wave_of[to];
                    moved = true;
                }
            }
        }
        if !moved {
            return;
        }
    }
}

/// A fixed pseudo-random key per target: a hash of the plan's name and the target.
fn shuffle_keys(plan_name: &str, targets: &[Target]) -> Vec<[u8; 8]> {
    targets
        .iter()
        .map(|t| {
            let mut h = Sha256::new();
            h.update(plan_name.as_bytes());
            h.update([0]);
            h.update(t.to_string().as_bytes());
            let digest = h.finalize();
            let mut key = [0u8; 8];
            key.copy_from_slice(&digest[..8]);
            key
        })
        .collect()
}

/// `candidates` in spread order: each shard's shuffled by their keys, then the shards
/// taken in turn, one target each, so any prefix holds about as many of each shard.
fn spread(candidates: &[usize], targets: &[Target], keys: &[[u8; 8]]) -> Vec<usize> {
    let mut by_shard: BTreeMap<&str, Vec<([u8; 8], usize)>> = BTreeMap::new();
    for &t in candidates {
        by_shard
            .entry(targets[t].shard.as_str())
            .or_default()
            .push((keys[t], t));
    }
    let mut columns: Vec<std::vec::IntoIter<([u8; 8], usize)>> = by_shard
        .into_values()
        .map(|mut v| {
            v.sort();
            v.into_iter()
        })
        .collect();
    // The shard taken first rotates with the keys too: `count = 1` is not always the
    // alphabetically first shard's.
    if let Some(first) = candidates.iter().map(|&t| keys[t]).min() {
        let turn = first[0] as usize % columns.len().max(1);
        columns.rotate_left(turn);
    }
    let mut order = Vec::with_capacity(candidates.len());
    while order.len() < candidates.len() {
        for column in &mut columns {
            if let Some((_, t)) = column.next() {
                order.push(t);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_core::pb;
    use std::collections::BTreeMap;

    /// 3 shards x 8 tenants; tenant_0 of each shard is labelled tier=internal.
    fn fleet() -> Expansion {
        let mut targets = Vec::new();
        let mut labels = Vec::new();
        for s in 0..3 {
            for t in 0..8 {
                let target = Target {
                    shard: format!("shard_{s}"),
                    tenant: format!("tenant_{t}"),
                };
                let mut l = BTreeMap::from([
                    ("shard".to_string(), target.shard.clone()),
                    ("tenant".to_string(), target.tenant.clone()),
                ]);
                if t == 0 {
                    l.insert("tier".into(), "internal".into());
                }
                targets.push(target);
                labels.push(l);
            }
        }
        Expansion {
            targets,
            labels,
            steps: Vec::new(),
            default_scope: flotilla_core::Scope::Tenant,
        }
    }

    fn spec(waves: Vec<pb::Wave>) -> PlanSpec {
        PlanSpec::try_from(pb::PlanSpec {
            name: "waves".into(),
            migrations: vec![pb::Migration {
                id: "m1".into(),
                up_sql: "CREATE TABLE x (a int)".into(),
                down_sql: "DROP TABLE x".into(),
                ..Default::default()
            }],
            waves,
            ..Default::default()
        })
        .expect("valid plan")
    }

    fn wave(name: &str) -> pb::Wave {
        pb::Wave {
            name: name.into(),
            ..Default::default()
        }
    }

    fn three_waves() -> Vec<pb::Wave> {
        vec![
            pb::Wave {
                selector: "tier=internal".into(),
                ..wave("canary")
            },
            pb::Wave {
                percent: 25.0,
                ..wave("quarter")
            },
            pb::Wave {
                rest: true,
                ..wave("rest")
            },
        ]
    }

    #[test]
    fn a_canary_a_quarter_and_the_rest_are_spread_and_stable() {
        let f = fleet();
        let s = spec(three_waves());
        let w = assign(&s, &f).unwrap();
        let count = |i: usize| w.iter().filter(|&&x| x == i).count();
        assert_eq!((count(0), count(1), count(2)), (3, 6, 15));
        for (t, &x) in w.iter().enumerate() {
            assert_eq!(x == 0, f.labels[t].contains_key("tier"), "{t}");
        }
        // the quarter takes two targets of each shard: spread, not one shard's first ones
        for shard in ["shard_0", "shard_1", "shard_2"] {
            let n = (0..w.len())
                .filter(|&t| w[t] == 1 && f.targets[t].shard == shard)
                .count();
            assert_eq!(n, 2, "{shard}");
        }
        assert_eq!(
            assign(&s, &f).unwrap(),
            w,
            "the same plan picks the same targets"
        );
    }

    #[test]
    fn overlapping_empty_and_missing_waves_are_refused_by_name() {
        let f = fleet();
        let mut overlap = three_waves();
        overlap.insert(
            1,
            pb::Wave {
                selector: "tenant=tenant_0".into(),
                ..wave("zeros")
            },
        );
        let e = assign(&spec(overlap), &f).unwrap_err().to_string();
        assert!(e.contains("`canary` and `zeros`"), "{e}");
        assert!(e.contains("shard_0/tenant_0"), "{e}");

        let mut empty = three_waves();
        empty[0].selector = "tier=nobody".into();
        let e = assign(&spec(empty.clone()), &f).unwrap_err().to_string();
        assert!(e.contains("wave `canary` selects no target"), "{e}");
        empty[0].optional = true;
        assert!(assign(&spec(empty), &f).is_ok());

        let e = assign(&spec(three_waves()[..2].to_vec()), &f)
            .unwrap_err()
            .to_string();
        assert!(e.contains("15 targets are in no wave"), "{e}");
    }

    #[test]
    fn a_step_the_canary_waits_for_on_its_shard_runs_with_the_canary() {
        // Each tenant's step waits for its shard's (a CREATE EXTENSION, say): the shard
        // targets join the earliest wave of a tenant of theirs.
        let mut f = fleet();
        let tenants = f.targets.len();
        for s in 0..3 {
            let shard = Target {
                shard: format!("shard_{s}"),
                tenant: String::new(),
            };
            f.labels
                .push(BTreeMap::from([("shard".into(), shard.shard.clone())]));
            f.targets.push(shard);
        }
        let shard_step = |s: usize| tenants + s;
        for t in 0..tenants {
            f.steps.push(crate::planner::PlannedStep {
                migration: 0,
                target: t,
                deps: vec![tenants + t / 8],
            });
        }
        for s in 0..3 {
            f.steps.push(crate::planner::PlannedStep {
                migration: 0,
                target: shard_step(s),
                deps: Vec::new(),
            });
        }
        let w = assign(&spec(three_waves()), &f).unwrap();
        for s in 0..3 {
            assert_eq!(w[shard_step(s)], 0, "shard_{s} runs with the canary");
        }
    }

    #[test]
    fn a_selector_after_a_share_takes_what_is_left_without_calling_it_overlap() {
        let f = fleet();
        let waves = vec![
            pb::Wave {
                percent: 50.0,
                ..wave("half")
            },
            pb::Wave {
                selector: "tier=internal".into(),
                optional: true,
                ..wave("internal")
            },
            pb::Wave {
                rest: true,
                ..wave("rest")
            },
        ];
        let w = assign(&spec(waves), &f).unwrap();
        assert_eq!(w.iter().filter(|&&x| x == 0).count(), 12);
        for (t, &x) in w.iter().enumerate() {
            if x == 1 {
                assert!(f.labels[t].contains_key("tier"), "{t}");
            }
        }
    }
}
