//! Completed plans' specs, decoded and checked once. `fleet status`, `fleet show` and a
//! catch-up read every completed plan's spec; decoded (hex, protobuf, the plan's checks) on
//! every call, their time grew with the history: 0.04 s with no plan, 0.75 s after 560, on
//! a debug build.
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use flotilla_core::{PlanSpec, pb};
use prost::Message;

use crate::store::PlanRow;

/// A hash of the stored spec (`plan rollback --down-from` replaces a plan's down SQL in
/// it) and the spec it decodes to (None: it does not decode, or a newer rule refuses it).
type Cached = (u64, Option<Arc<PlanSpec>>);

/// By plan id.
#[derive(Debug, Default)]
pub struct SpecCache {
    specs: Mutex<HashMap<String, Cached>>,
}

impl SpecCache {
    /// The specs of `rows`, in their order; plans not among them leave the cache (it holds
    /// the completed plans, no more).
    pub fn specs(&self, rows: &[PlanRow]) -> Vec<Option<Arc<PlanSpec>>> {
        let mut specs = self.specs.lock().expect("spec cache lock");
        let out = rows
            .iter()
            .map(|row| {
                let hash = hash_of(&row.spec_hex);
                if let Some((h, spec)) = specs.get(&row.id)
                    && *h == hash
                {
                    return spec.clone();
                }
                let spec = decode(&row.spec_hex).map(Arc::new);
                specs.insert(row.id.clone(), (hash, spec.clone()));
                spec
            })
            .collect();
        if specs.len() > rows.len() {
            let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            specs.retain(|id, _| ids.contains(id.as_str()));
        }
        out
    }
}

fn hash_of(spec_hex: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    spec_hex.hash(&mut h);
    h.finish()
}

fn decode(spec_hex: &str) -> Option<PlanSpec> {
    hex::decode(spec_hex)
        .ok()
        .and_then(|b| pb::PlanSpec::decode(b.as_slice()).ok())
        .and_then(|p| PlanSpec::try_from(p).ok())
}
