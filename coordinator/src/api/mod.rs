//! The gRPC layer: convert, call the domain, map the error; beside it the
//! standard health and reflection services ([`health`]); operator RPCs pass
//! [`auth`] first.
mod agents;
mod auth;
mod health;
mod operator;
pub mod peer;

pub(crate) use auth::{Authenticated, Peer, PlanNamed};

pub(crate) use health::{health_service, reflection_services};

use std::pin::Pin;

use futures::Stream;
use tonic::Status;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
