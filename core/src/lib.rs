//! Flotilla's core, shared by the coordinator, the agent and the CLI: the domain model
//! and the wire contract (`flotilla.v1`) it converts from, and the protocol beyond the
//! messages.
//!
//! - [`model`], [`waves`]: plans, migrations, targets, rollouts (always valid once built);
//!   [`dag`]: the migration graph; [`selector`]: label selectors; [`sql`]: statement lexing;
//!   [`lint`]: statements read with PostgreSQL's own parser (kinds, locks, lint rules);
//! - [`pb`]: the generated protobuf and gRPC code; [`convert`]: wire to domain (`TryFrom`
//!   validates everything, so code past the edge never sees a half-valid plan) and back;
//! - [`protocol`]: gids, etcd keys, decisions, refusal metadata, SQLSTATEs; [`state`]: plan
//!   and step states with their one string each; [`secrets`]: the one redactor;
//!   [`tls`]: TLS material from files, and what counts as loopback; [`credential_files`]:
//!   passwords read from files, and files others on the host can read; [`reload`]:
//!   requests to read files again (SIGHUP).

pub mod convert;
pub mod credential_files;
pub mod dag;
pub mod foreign;
pub mod lint;
pub mod model;
pub mod protocol;
pub mod reload;
pub mod secrets;
pub mod selector;
pub mod sql;
pub mod state;
pub mod tls;
pub mod waves;

/// Generated protobuf and gRPC code for `flotilla.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("flotilla.v1");

    /// The encoded `FileDescriptorSet` of `flotilla.v1`, served by the
    /// coordinator's reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/flotilla_v1_descriptor.bin"));
}

pub use model::*;
