//! The agent's one way to etcd: which members, how a client to them is built (connect
//! options, which member is tried first, time limits), and the bound on every call. Two
//! parts of the agent talk to etcd: the liveness key (`liveness`) and the reads of plans'
//! commit decisions (`run::two_phase`).
//!
//! They keep a client each, built here, rather than share one: the liveness client carries a
//! lease's keep-alive stream for the agent's whole life, which a per-request timeout would
//! cut, while a decision read must be bounded per request and is retried through a client
//! that starts at another member, so one dead member does not strand a prepared
//! transaction. A client is cheap next to a prepared transaction left in doubt.
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::config::{AgentConfig, redact_dsn};

pub(crate) mod liveness;

/// Why an etcd call did not answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EtcdError {
    #[error(transparent)]
    Client(#[from] etcd_client::Error),
    /// A balanced channel with no member up waits forever: every call is bounded.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Why etcd refused the agent's user, which trying again does not mend until an operator
/// does (its user, password or role): not "unreachable".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No such user, or the wrong password (`--etcd-user`, `--etcd-password-file`).
    Authentication,
    /// The user may not touch the agents' keys (its role's permissions).
    Permission,
}

impl EtcdError {
    /// Whether etcd refused the agent's user (rather than not answering).
    pub fn refusal(&self) -> Option<Refusal> {
        let EtcdError::Client(etcd_client::Error::GRpcStatus(status)) = self else {
            return None;
        };
        let message = status.message();
        // Not an expired or invalid token (UNAUTHENTICATED, `invalid auth token`): etcd
        // restarted, or the token's TTL passed, and the next connection authenticates
        // again; said as "the wrong password" it sent an operator after the wrong thing.
        if message.contains("authentication failed") || message.contains("user name is empty") {
            Some(Refusal::Authentication)
        } else if status.code() == tonic::Code::PermissionDenied
            || message.contains("permission denied")
        {
            Some(Refusal::Permission)
        } else {
            None
        }
    }
}

/// What a client is for, which decides how it is built.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Usage {
    /// A lease and its keep-alive stream: HTTP/2 keep-alives find a dead connection, and no
    /// request timeout, which would end the stream.
    Lease,
    /// Short reads: connecting and every request bounded by the given time.
    Reads(Duration),
}

/// The etcd cluster of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Etcd {
    endpoints: Vec<String>,
    /// The endpoints as logs may show them (no password).
    pub shown: String,
    /// The prefix of every Flotilla key (the coordinators' `--etcd-prefix`).
    pub prefix: String,
    tls: Option<tonic::transport::ClientTlsConfig>,
    user: Option<flotilla_core::tls::Credentials>,
}

impl Etcd {
    /// None when no etcd is configured.
    pub fn from_config(config: &AgentConfig) -> Option<Etcd> {
        if config.etcd.is_empty() {
            return None;
        }
        Some(Etcd {
            endpoints: config.etcd.iter().map(|e| e.trim().to_string()).collect(),
            shown: config
                .etcd
                .iter()
                .map(|e| redact_dsn(e))
                .collect::<Vec<_>>()
                .join(","),
            prefix: config.etcd_prefix.clone(),
            tls: config.etcd_tls.clone(),
            user: config.etcd_user.clone(),
        })
    }

    /// The etcd user the agent authenticates as (`--etcd-user`), if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_ref().map(|c| c.user.as_str())
    }

    /// How many members the configuration names.
    pub fn members(&self) -> usize {
        self.endpoints.len()
    }

    /// A client for `usage` whose endpoint list starts at member `first` (modulo their
    /// number), connected within `limit`.
    pub async fn connect(
        &self,
        first: usize,
        usage: Usage,
        limit: Duration,
    ) -> Result<Client, EtcdError> {
        let options = match usage {
            Usage::Lease => ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5)),
            Usage::Reads(bound) => ConnectOptions::new()
                .with_connect_timeout(bound)
                .with_timeout(bound),
        };
        let options = match &self.tls {
            Some(tls) => options.with_tls(tls.clone()),
            None => options,
        };
        let options = match &self.user {
            // etcd's tokens expire (--auth-token-ttl, 5 minutes idle by default) and die
            // with an `auth disable`: the client authenticates again and retries once
            // when its token is refused, or every etcd call after would fail.
            Some(c) => options
                .with_user(c.user.clone(), c.password.clone())
                .with_auto_token_refresh(true),
            None => options,
        };
        let mut endpoints = self.endpoints.clone();
        if !endpoints.is_empty() {
            let n = endpoints.len();
            endpoints.rotate_left(first % n);
        }
        // boxed: the client's connect future is deeply nested, and `start`'s future holds
        // this one (through the in-doubt scan) beyond the compiler's default query depth
        call(limit, Box::pin(Client::connect(endpoints, Some(options)))).await
    }
}

/// One etcd call with a time limit.
pub(crate) async fn call<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(limit, f).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(EtcdError::Timeout(limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, message: &str) -> EtcdError {
        EtcdError::Client(etcd_client::Error::GRpcStatus(tonic::Status::new(
            code, message,
        )))
    }

    /// etcd's refusals of a user are told from its being away: the agent said "unreachable"
    /// of a wrong password, and retried for good without a word of it.
    #[test]
    fn a_refused_user_is_told_from_etcd_away() {
        let wrong = status(
            tonic::Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password",
        );
        assert_eq!(wrong.refusal(), Some(Refusal::Authentication));
        let denied = status(
            tonic::Code::PermissionDenied,
            "etcdserver: permission denied",
        );
        assert_eq!(denied.refusal(), Some(Refusal::Permission));
        // a token that expired (etcd restarted) is mended by the next connection
        let expired = status(
            tonic::Code::Unauthenticated,
            "etcdserver: invalid auth token",
        );
        assert_eq!(expired.refusal(), None);
        let away = status(tonic::Code::Unavailable, "connection refused");
        assert_eq!(away.refusal(), None);
        assert_eq!(EtcdError::Timeout(Duration::from_secs(1)).refusal(), None);
    }
}
