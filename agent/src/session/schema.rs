//! Every target's schema fingerprint, read with the journal rows it goes with (the whole
//! journal: every target; the rows of the targets whose runs ended: those) and sent after
//! them, so the coordinator's drift view compares shapes of targets with the same migrations
//! applied.
use std::collections::BTreeMap;
use std::time::Instant;

use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body as Out;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use sqlx::postgres::PgConnection;

use crate::Agent;
use crate::shard;

/// Items per message: a shape is a few dozen items, and each distinct shape goes once, so
/// this only splits a shard whose tenants are nearly all of different shapes.
const CHUNK_ITEMS: usize = 20_000;

/// Each target's fingerprint and items, as the shard's catalog gave them, and how long
/// reading them took.
pub(super) struct Found {
    targets: BTreeMap<String, (String, Vec<String>)>,
    read_ms: u64,
}

/// Reads the fingerprints of `targets` (None: every target, the shard's own schemas with
/// them). None when the catalog cannot be read: logged, and the next refresh tries again.
pub(super) async fn read(
    agent: &Agent,
    conn: &mut PgConnection,
    targets: Option<&[String]>,
) -> Option<Found> {
    let every_tenant: Vec<String> = agent.known_tenants().into_iter().map(|t| t.name).collect();
    let (tenants, shard_itself) = match targets {
        None => (every_tenant.clone(), true),
        Some(targets) => (
            targets.iter().filter(|t| !t.is_empty()).cloned().collect(),
            targets.iter().any(String::is_empty),
        ),
    };
    let started = Instant::now();
    match shard::read_fingerprints(conn, &tenants, shard_itself, &every_tenant).await {
        Ok(targets) => {
            let read_ms = started.elapsed().as_millis() as u64;
            debug!(targets = targets.len(), read_ms, "schema fingerprints read");
            Some(Found { targets, read_ms })
        }
        Err(error) => {
            warn!(error = %crate::error::Shown(&error), "cannot read the schema fingerprints for the coordinator's drift view");
            None
        }
    }
}

/// Tells the coordinator that it holds no current fingerprint for `targets` (their journal
/// rows moved on; the fingerprints follow when the shard is idle): they show as not
/// fingerprinted in its drift view meanwhile, never as drifted.
pub(super) async fn clear(
    tx: &mpsc::Sender<pb::AgentMessage>,
    targets: Vec<String>,
) -> Result<(), String> {
    let report = pb::SchemaReport {
        last: true,
        targets,
        ..Default::default()
    };
    tx.send(pb::AgentMessage {
        body: Some(Out::Schema(report)),
    })
    .await
    .map_err(|_| "the stream closed".to_string())
}

/// Sends what `read` found for `targets` (None: every target), each distinct shape once,
/// in chunks; the last message carries the fingerprints.
pub(super) async fn send(
    tx: &mpsc::Sender<pb::AgentMessage>,
    found: Found,
    targets: Option<&[String]>,
) -> Result<(), String> {
    let mut shapes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut fingerprints = Vec::with_capacity(found.targets.len());
    for (target, (fingerprint, items)) in found.targets {
        shapes.entry(fingerprint.clone()).or_insert(items);
        fingerprints.push(pb::TargetFingerprint {
            target,
            fingerprint,
        });
    }
    let message = |report| pb::AgentMessage {
        body: Some(Out::Schema(report)),
    };
    let closed = |_| "the stream closed".to_string();
    let mut chunk = Vec::new();
    let mut items = 0;
    for (fingerprint, shape) in shapes {
        if items > 0 && items + shape.len() > CHUNK_ITEMS {
            let report = pb::SchemaReport {
                shapes: std::mem::take(&mut chunk),
                ..Default::default()
            };
            tx.send(message(report)).await.map_err(closed)?;
            items = 0;
        }
        items += shape.len();
        chunk.push(pb::SchemaShape {
            fingerprint,
            items: shape,
        });
    }
    let last = pb::SchemaReport {
        shapes: chunk,
        last: true,
        whole: targets.is_none(),
        targets: targets.map(<[String]>::to_vec).unwrap_or_default(),
        fingerprints,
        read_ms: found.read_ms,
    };
    tx.send(message(last)).await.map_err(closed)
}
