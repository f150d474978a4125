//! The gRPC layer: convert, call the domain, map the error. Nothing else.
mod agents;
mod operator;

use std::pin::Pin;

use futures::Stream;
use tonic::Status;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
