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
/// name. Such a call goes on as one without a certificate (a bearer token may still
/// authenticate it), its refusal saying whose certificate it was.
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
            match coordinator
                .authenticate(&method, bearer.as_deref(), &subject, &peer)
                .await
            {
                Ok(caller) => {
                    if let Some(caller) = caller {
                        req.extensions_mut().insert::<Caller>(caller);
                    }
                    req.extensions_mut().insert(Peer(peer));
                    inner.call(req).await
                }
                Err(e) => Ok(tonic::Status::from(e).into_http()),
            }
        })
    }
}
