//! What the versions tests share: the fleet they look at.
use std::collections::BTreeMap;

use crate::planner::ShardView;

/// Two shards x three tenants; tenant_1 of each shard is automotive, the others are not.
pub(super) fn two_shards_three_tenants() -> BTreeMap<String, ShardView> {
    (0..2)
        .map(|s| {
            let tenants = (0..3)
                .map(|t| {
                    let industry = if t == 1 {
                        "automotive"
                    } else {
                        "home_services"
                    };
                    (
                        format!("tenant_{t}"),
                        BTreeMap::from([("industry".to_string(), industry.to_string())]),
                    )
                })
                .collect();
            let view = ShardView {
                labels: BTreeMap::new(),
                tenants,
            };
            (format!("shard_{s}"), view)
        })
        .collect()
}
