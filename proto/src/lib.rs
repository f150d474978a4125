//! Flotilla's wire contract (`flotilla.v1`) and the domain model it converts into.
//!
//! The generated types live in [`pb`]; the domain types in [`model`]. Conversion
//! from wire to domain (`TryFrom`) validates everything, so code past the edge
//! never sees a half-valid plan.

pub mod convert;
pub mod dag;
pub mod model;
pub mod protocol;
pub mod secrets;
pub mod selector;
pub mod sql;
pub mod state;

/// Generated protobuf and gRPC code for `flotilla.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("flotilla.v1");
}

pub use model::*;
