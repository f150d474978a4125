//! The one place operator RPCs are authenticated: a wrapper around the generated
//! `OperatorServiceServer` that, before any handler runs, reads the method from the
//! path, the credential from the `authorization` metadata and the peer address, asks the
//! domain ([`Coordinator::authenticate`]) and either refuses (UNAUTHENTICATED,
//! PERMISSION_DENIED; audited there) or hands the request on with the [`Caller`] and
//! [`Peer`] in its extensions, where handlers read who acts.
//!
//! The credential: a bearer token (`authorization: Bearer ...`), or else, under mTLS, the
//! client certificate's common name (the operator of that name; its role from the store).
//!
//! Only the operator service is wrapped: health and reflection stay open (probes), and
//! agents' `AgentService/Attach` is not an operator's call; agents are authenticated by
//! their client certificates (mTLS, `crate::identity`), not by tokens.
use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::auth::{Caller, CertSubject};
use crate::service::Coordinator;

/// Where a request came from (`ip:port`, or `unknown`), for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer(pub String);

/// The operator name a verified client certificate gives (its common name), whether or not
/// authentication is on: with it off, a CLI with a certificate names nobody itself (its
/// default `--as` is left out for the certificate to name who acts), and the audit trail
/// takes the certificate's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertName(pub String);

/// The plan a plan command names (see [`names_plan`]), for the audit trail: a refusal of
/// `plan approve` by a viewer is found under that plan (`audit list --plan ID`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlanNamed(pub String);

/// Methods whose request names a plan in field 1 (`PlanCommand`, `ApprovalRequest`,
/// `RetryRequest`).
fn names_plan(method: &str) -> bool {
    matches!(
        method,
        "CancelPlan"
            | "RollbackPlan"
            | "PausePlan"
            | "ResumePlan"
            | "PromotePlan"
            | "HaltPlan"
            | "ForgetShard"
            | "RetryPlan"
            | "ApprovePlan"
            | "RejectPlan"
    )
}

/// Field 1 of those requests; prost skips the rest.
#[derive(Clone, PartialEq, prost::Message)]
struct NamesPlan {
    #[prost(string, tag = "1")]
    plan_id: String,
}

/// The most of a plan command read (the server's own limit on a message: a rollback's
/// `--down-from` carries whole migrations).
const PLAN_COMMAND_LIMIT: usize = flotilla_core::protocol::MAX_MESSAGE_BYTES;

/// The plan id of a buffered unary gRPC request body (one uncompressed frame: flag byte,
/// 4-byte length, the message), or "" when it cannot be read or is not a plain id.
fn plan_id_of(frame: &[u8]) -> String {
    use prost::Message;
    let Some((&0, rest)) = frame.split_first() else {
        return String::new();
    };
    let Some(len) = rest
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    else {
        return String::new();
    };
    let Some(message) = rest.get(4..4 + len as usize) else {
        return String::new();
    };
    match NamesPlan::decode(message) {
        Ok(m) if m.plan_id.len() <= 128 && m.plan_id.chars().all(|c| c.is_ascii_graphic()) => {
            m.plan_id
        }
        _ => String::new(),
    }
}

/// Reads a plan command's body for its plan id, and gives back a body of the same bytes.
async fn read_plan_named(body: Body) -> Result<(Body, String), tonic::Status> {
    use http_body_util::BodyExt;
    let bytes: bytes::Bytes = http_body_util::Limited::new(body, PLAN_COMMAND_LIMIT)
        .collect()
        .await
        .map_err(|e| {
            tonic::Status::invalid_argument(format!(
                "the request could not be read (at most {PLAN_COMMAND_LIMIT} bytes): {e}"
            ))
        })?
        .to_bytes();
    let plan_id = plan_id_of(&bytes);
    Ok((Body::new(http_body_util::Full::new(bytes)), plan_id))
}

#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    coordinator: Coordinator,
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, coordinator: Coordinator) -> Authenticated<S> {
        Authenticated { inner, coordinator }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

/// The connection's TLS information, when it came over TLS.
fn tls_info(req: &http::Request<Body>) -> Option<&TlsConnectInfo<TcpConnectInfo>> {
    req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()
}

/// The client certificate the connection presented (verified against the CA in the
/// handshake, under mTLS): its common name names the operator, whose role is the store's.
/// An agent's certificate (one that names a shard: a `flotilla-agent:` URI SAN, or a
/// common name in `--agent-identities`) names no operator, whatever its common name: a
/// shard's host, or whoever took its key, is not the operator who happens to share the
/// name. Such a call is refused (PERMISSION_DENIED, whether or not operators authenticate:
/// with none in the store, it had the whole operator API), unless a bearer token of an
/// operator authenticates it.
fn certificate_subject(req: &http::Request<Body>, coordinator: &Coordinator) -> CertSubject {
    let Some(cert) = tls_info(req)
        .and_then(|tls| tls.peer_certs())
        .and_then(|certs| super::peer::PeerCert::from_der(certs.first()?.as_ref()))
    else {
        return CertSubject::None;
    };
    let shards = coordinator.inner.agent_identities.shards_of(&cert);
    match cert.common_name {
        _ if !shards.is_empty() => CertSubject::Agent(format!(
            "common name {}, shard {}",
            cert.common_name.as_deref().unwrap_or("(none)"),
            shards.join(", ")
        )),
        Some(name) => CertSubject::Operator {
            name,
            valid_from_s: cert.valid_from_s,
        },
        None => CertSubject::None,
    }
}

/// Where the request came from, over TLS or not.
fn peer_address(req: &http::Request<Body>) -> Option<std::net::SocketAddr> {
    match tls_info(req) {
        Some(tls) => tls.get_ref().remote_addr(),
        None => req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|i| i.remote_addr()),
    }
}

impl<S> Service<http::Request<Body>> for Authenticated<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone that was not polled ready stays here; the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let coordinator = self.coordinator.clone();
        Box::pin(async move {
            let method = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_string();
            let peer = peer_address(&req).map_or_else(|| "unknown".to_string(), |a| a.to_string());
            // A header that is not text is a malformed credential, not a missing one.
            let bearer = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap_or("").to_string());
            let subject = certificate_subject(&req, &coordinator);
            let cert_name = match &subject {
                CertSubject::Operator { name, .. } => Some(CertName(name.clone())),
                _ => None,
            };
            let mut plan_id = String::new();
            if names_plan(&method) {
                let (parts, body) = req.into_parts();
                match read_plan_named(body).await {
                    Ok((body, id)) => {
                        plan_id = id;
                        req = http::Request::from_parts(parts, body);
                    }
                    Err(status) => return Ok(status.into_http()),
                }
            }
            match coordinator
                .authenticate(&method, bearer.as_deref(), &subject, &peer, &plan_id)
                .await
            {
                Ok(caller) => {
                    if let Some(caller) = caller {
                        req.extensions_mut().insert::<Caller>(caller);
                    }
                    req.extensions_mut().insert(Peer(peer));
                    req.extensions_mut().insert(PlanNamed(plan_id));
                    if let Some(name) = cert_name {
                        req.extensions_mut().insert(name);
                    }
                    inner.call(req).await
                }
                Err(e) => Ok(tonic::Status::from(e).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(message: &[u8]) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&(message.len() as u32).to_be_bytes());
        f.extend_from_slice(message);
        f
    }

    /// A plan command's plan id is read from its body as the handler would read it; what
    /// is not one plain id (compressed, cut short, hostile) names no plan.
    #[test]
    fn a_plan_commands_plan_id_is_read_from_its_frame() {
        use prost::Message;
        let approve = flotilla_core::pb::ApprovalRequest {
            plan_id: "p-123".into(),
            actor: "bob".into(),
            reason: "fine".into(),
            ..Default::default()
        };
        let retry = flotilla_core::pb::RetryRequest {
            plan_id: "p-9".into(),
            targets: vec!["shard_0/t1".into()],
            ..Default::default()
        };
        assert_eq!(plan_id_of(&frame(&approve.encode_to_vec())), "p-123");
        assert_eq!(plan_id_of(&frame(&retry.encode_to_vec())), "p-9");
        let mut compressed = frame(&approve.encode_to_vec());
        compressed[0] = 1;
        assert_eq!(plan_id_of(&compressed), "");
        let whole = frame(&approve.encode_to_vec());
        assert_eq!(plan_id_of(&whole[..whole.len() - 2]), "");
        assert_eq!(plan_id_of(&[]), "");
        let hostile = flotilla_core::pb::PlanCommand {
            plan_id: "p 1\n".into(),
            ..Default::default()
        };
        assert_eq!(plan_id_of(&frame(&hostile.encode_to_vec())), "");
        assert!(names_plan("ApprovePlan") && !names_plan("SubmitPlan"));
    }
}
