//! How the operator commands call a coordinator: the connection (plaintext or TLS, see
//! `transport`), the operator's credential on every request, a follower's refusal followed
//! to the leader, and a refused call as an exit code.
use flotilla_core::pb::operator_service_client::OperatorServiceClient;
use tonic::codegen::InterceptedService;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;

use super::{EXIT_BAD_INPUT, EXIT_UNAVAILABLE};
/// What went wrong talking to the coordinator, as an exit code and a message.
pub(super) fn status_exit(e: &tonic::Status) -> u8 {
    use tonic::Code::*;
    match e.code() {
        InvalidArgument | FailedPrecondition | NotFound | AlreadyExists | OutOfRange
        | PermissionDenied | Unauthenticated => EXIT_BAD_INPUT,
        _ => EXIT_UNAVAILABLE,
    }
}

/// The innermost cause of an error: a connection cut or refused (e.g. by a TLS alert)
/// says why only at the end of its source chain; "transport error" alone does not help.
fn innermost_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = None;
    let mut source = e.source();
    while let Some(s) = source {
        cause = Some(s.to_string());
        source = s.source();
    }
    cause.filter(|c| *c != e.to_string())
}

pub(super) fn fail(e: tonic::Status) -> u8 {
    // A server that does not serve Flotilla's operator service (the coordinator's
    // --health-listen port, another gRPC server) answers UNIMPLEMENTED with no message:
    // the error line was `error: ` and nothing else.
    if e.code() == tonic::Code::Unimplemented && e.message().is_empty() {
        eprintln!(
            "error: the server at --coordinator does not serve Flotilla's operator service (UNIMPLEMENTED): is it a coordinator's --listen address, not its --health-listen or --metrics port?"
        );
        return status_exit(&e);
    }
    let cause = innermost_cause(&e).filter(|c| c != e.message());
    match &cause {
        Some(cause) => eprintln!("error: {}: {cause}", e.message()),
        None => eprintln!("error: {}", e.message()),
    }
    // a status with a source was made here, from the connection, not sent by a coordinator
    let local = std::error::Error::source(&e).is_some()
        || matches!(e.code(), tonic::Code::Unknown | tonic::Code::Cancelled);
    let tls = !super::transport::files().is_empty();
    if local && tls {
        eprintln!(
            "hint: over TLS, the coordinator may have refused this client's certificate: check --tls-cert, --tls-key and that --tls-ca is the coordinator's CA"
        );
    } else if local {
        // A TLS server answers plaintext HTTP/2 with an alert and closes: read here as a
        // frame of invalid size or a broken pipe, depending on timing.
        // Or the coordinator stopped (killed, failed over) while it answered: a command may
        // have taken effect before, or not, and the operator must look rather than assume
        // either (a pause that read as failed had been stored; another had not).
        eprintln!(
            "hint: the connection broke under the call: if the coordinator stopped or lost its leadership meanwhile, the command may or may not have taken effect; look (`flotilla plan status ID`, `flotilla audit list --plan ID`) before sending it again. If the coordinator serves TLS, use --coordinator https://HOST:PORT with --tls-ca (and --tls-cert and --tls-key when it requires client certificates)"
        );
    }
    status_exit(&e)
}

/// The operator's bearer token, read once from `--token-file` (or FLOTILLA_TOKEN_FILE);
/// unset: requests carry no credential (a coordinator with authentication off).
static CREDENTIAL: std::sync::OnceLock<AsciiMetadataValue> = std::sync::OnceLock::new();

/// Reads the token file (its content is never printed, and never taken from argv).
pub(super) fn set_credential(path: Option<&std::path::Path>) -> Result<(), String> {
    let Some(path) = path else {
        return Ok(());
    };
    // (read as every credential file is: its first line that is not blank or a `#` comment)
    let token = flotilla_core::credential_files::read_token("--token-file", path)
        .map_err(|e| e.to_string())?;
    // A credential others on the host can read is theirs too: said (as ssh does of a key),
    // not refused (the token still works for whoever holds it; refusing would not undo that).
    if let Some(warning) = flotilla_core::credential_files::exposure_warning("--token-file", path) {
        eprintln!("warning: {warning} (`operator add --token-out` makes it so)");
    }
    let mut value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| {
            format!(
                "--token-file {}: not a token (not plain text)",
                path.display()
            )
        })?;
    // Never indexed by HTTP/2 header compression, where a later request could probe it.
    value.set_sensitive(true);
    let _ = CREDENTIAL.set(value);
    Ok(())
}

/// Puts the credential (if any) on every request.
#[derive(Clone)]
pub(super) struct Bearer;

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = CREDENTIAL.get() {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub(super) type Client = OperatorServiceClient<InterceptedService<Channel, Bearer>>;

/// Who acts, as the request says it: with a credential (a token, or a client certificate
/// whose name the coordinator reads), the coordinator takes the name from it, so the default
/// `--as` ($USER) is not sent (it would mismatch and be refused: a pipeline with a
/// certificate alone had every write refused unless its $USER was the certificate's name);
/// an `--as` given explicitly that differs from the default still is, and is refused
/// unless it names the credential's operator.
pub(super) fn acting(said: String) -> String {
    let default = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let credential = CREDENTIAL.get().is_some() || super::transport::files().cert.is_some();
    if credential && said == default {
        String::new()
    } else {
        said
    }
}

/// Connects to the first reachable coordinator of a comma-separated list.
pub(super) async fn client(addrs: &str) -> Result<Client, u8> {
    let mut why = Vec::new();
    match client_of_list(addrs, &mut why).await {
        Ok((c, _, _)) => Ok(c),
        Err(Unreached::Said(code)) => Err(code),
        Err(Unreached::Down) => {
            eprintln!("error: cannot reach a coordinator ({})", why.join("; "));
            Err(EXIT_UNAVAILABLE)
        }
    }
}

/// Why no coordinator of a list was reached.
enum Unreached {
    /// Said already (a bad address, a coordinator answering in plaintext); the exit code.
    Said(u8),
    /// None answered; each address and why are in the caller's list.
    Down,
}

/// A client on the first coordinator of `addrs` that answers, with its address and the
/// addresses after it; each one passed over is added to `why`, with the reason.
async fn client_of_list<'a>(
    addrs: &'a str,
    why: &mut Vec<String>,
) -> Result<(Client, &'a str, &'a str), Unreached> {
    // (a CI secret left unset often reaches a variable as the empty string)
    if addrs.split(',').all(|a| a.trim().is_empty()) {
        eprintln!(
            "error: no coordinator address given: --coordinator (or FLOTILLA_COORDINATOR) is empty"
        );
        return Err(Unreached::Said(EXIT_BAD_INPUT));
    }
    let mut rest = addrs;
    while !rest.is_empty() {
        let (addr, after) = rest.split_once(',').unwrap_or((rest, ""));
        rest = after;
        let addr = addr.trim();
        if addr.is_empty() {
            continue;
        }
        let endpoint = match super::transport::endpoint(addr) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("error: {e}");
                return Err(Unreached::Said(EXIT_BAD_INPUT));
            }
        };
        let https = endpoint.uri().scheme_str() == Some("https");
        match endpoint.connect().await {
            Ok(ch) if !answers(ch.clone()).await => {
                // accepted the connection (its host's kernel did) and said nothing: stopped
                // (SIGSTOP, a stalled VM) or swamped. The next address, rather than a call
                // that waits for good (`--coordinator frozen,leader` hung).
                why.push(format!(
                    "{addr}: connected, but no answer within {}s",
                    PROBE_WITHIN.as_secs()
                ));
            }
            Ok(ch) => {
                let c = OperatorServiceClient::with_interceptor(ch, Bearer)
                    .max_decoding_message_size(flotilla_core::protocol::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(flotilla_core::protocol::MAX_MESSAGE_BYTES);
                return Ok((c, addr, rest));
            }
            Err(e) => {
                let failed = match innermost_cause(&e) {
                    Some(cause) => format!("{addr}: {e}: {cause}"),
                    None => format!("{addr}: {e}"),
                };
                // The TLS handshake of an https:// address failed on a record that is
                // not TLS: something answers there, in plaintext.
                if https
                    && (failed.contains("InvalidContentType") || failed.contains("corrupt message"))
                {
                    eprintln!("error: cannot reach a coordinator ({failed})");
                    eprintln!(
                        "hint: {addr} answered in plaintext, not TLS: the coordinator there runs without --tls-cert (use http:// for it, on loopback only)"
                    );
                    return Err(Unreached::Said(EXIT_UNAVAILABLE));
                }
                why.push(failed);
            }
        }
    }
    Err(Unreached::Down)
}

/// How long a coordinator that took the connection has to answer its health service.
const PROBE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether the coordinator on `ch` answers at all: its health service, open to any client
/// (any answer counts, a refusal too: the call that follows says what it is).
async fn answers(ch: Channel) -> bool {
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let check = health.check(tonic_health::pb::HealthCheckRequest::default());
    tokio::time::timeout(PROBE_WITHIN, check).await.is_ok()
}

/// Where a follower says the leader is, when it refused a write.
fn leader_of(e: &tonic::Status) -> Option<String> {
    if e.code() != tonic::Code::Unavailable {
        return None;
    }
    let v = e.metadata().get(flotilla_core::protocol::LEADER_METADATA)?;
    v.to_str()
        .ok()
        .filter(|l| *l != flotilla_core::protocol::NO_LEADER)
        .map(str::to_string)
}

/// A "not the leader" refusal that names no leader: none leads now.
fn no_leader_yet(e: &tonic::Status) -> bool {
    e.code() == tonic::Code::Unavailable
        && e.metadata()
            .get(flotilla_core::protocol::REFUSAL_METADATA)
            .and_then(|v| v.to_str().ok())
            == Some(flotilla_core::protocol::REFUSAL_NOT_LEADER)
}

/// Why a write did not reach the leader.
enum LeaderMiss {
    /// The follower asked named a leader the CLI may not follow (a plaintext one under
    /// TLS): why. Another coordinator of `--coordinator` may name another, or lead.
    RedirectRefused(String),
    /// Said already; the exit code.
    Exit(u8),
}

impl From<u8> for LeaderMiss {
    fn from(code: u8) -> LeaderMiss {
        LeaderMiss::Exit(code)
    }
}

/// Runs a write on the leader: a follower's refusal names it, and the call
/// goes there (a few hops at most, leadership may be moving).
async fn on_leader<T, F, Fut>(c: &mut Client, mut call: F) -> Result<T, LeaderMiss>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut hops = 0;
    let mut waits = 0;
    let mut followed: Option<String> = None;
    loop {
        match call(c.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(e) => match leader_of(&e) {
                // (refused before anything is sent there: not even a probe of it)
                // (exit 3: the leader cannot be reached as it must be, a coordinator's
                // configuration, not the command's input)
                Some(leader) if let Err(why) = super::transport::may_follow(&leader) => {
                    return Err(LeaderMiss::RedirectRefused(why));
                }
                // The coordinator this call was sent to, as the leader it names: itself, from
                // a leader key that outlived its term (etcd back after an outage) until the
                // next election. Asked again after a pause, as while none leads; before, the
                // command failed at once, "not the leader; the leader is" the one it asked.
                Some(leader)
                    if followed.as_deref() == Some(leader.as_str()) && waits < LEADER_WAITS =>
                {
                    if waits == 0 {
                        eprintln!(
                            "note: {leader} names itself the leader but does not lead yet; waiting for the election"
                        );
                    }
                    waits += 1;
                    tokio::time::sleep(LEADER_WAIT).await;
                }
                // The leader a follower names is gone (killed: its term lasts until its
                // lease runs out): asked again after a pause, the follower names the next
                // one once it is elected. Before, the command failed at once "cannot reach
                // a coordinator", naming the dead one, with the others up.
                Some(leader) if waits < LEADER_WAITS && !reachable(&leader).await => {
                    if waits == 0 {
                        eprintln!(
                            "note: the leader named ({leader}) does not answer; waiting for the next one to be elected"
                        );
                    }
                    waits += 1;
                    tokio::time::sleep(LEADER_WAIT).await;
                }
                Some(leader) if hops < 3 => {
                    hops += 1;
                    *c = client(&leader).await?;
                    followed = Some(leader);
                }
                // no coordinator leads at this instant (an election under way): the same
                None if waits < LEADER_WAITS && no_leader_yet(&e) => {
                    if waits == 0 {
                        eprintln!("note: no coordinator leads now; waiting for one to be elected");
                    }
                    waits += 1;
                    tokio::time::sleep(LEADER_WAIT).await;
                }
                _ => return Err(LeaderMiss::Exit(fail(e))),
            },
        }
    }
}

/// How often, and how long apart, a command asks again where the leader is when the one
/// named does not answer (an election after a leader died takes up to its lease's TTL,
/// 10 s by default).
pub(super) const LEADER_WAITS: u32 = 10;
pub(super) const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a coordinator answers a connection at `addr` (quietly: the command goes on
/// elsewhere if not).
async fn reachable(addr: &str) -> bool {
    let Ok(endpoint) = super::transport::endpoint(addr) else {
        return false;
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), endpoint.connect())
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Connects to a coordinator and runs `rpc` with `req` on the leader (see [`on_leader`]):
/// the answer, and the client, now on the leader, for a `--wait` that follows the plan
/// there.
pub(super) async fn ask_leader<Req, Resp, F, Fut>(
    addr: &str,
    req: Req,
    rpc: F,
) -> Result<(Client, Resp), u8>
where
    Req: Clone,
    F: Fn(Client, Req) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    // Each address of the list in turn, while the one reached redirects to a leader that
    // may not be followed: another may lead, or name another leader. Before, the command
    // gave up at the first such redirect, with the leader listed after it.
    let mut rest = addr;
    let mut why: Vec<String> = Vec::new();
    let mut redirects_refused = false;
    loop {
        let (mut c, reached, after) = match client_of_list(rest, &mut why).await {
            Ok(found) => found,
            Err(Unreached::Said(code)) => return Err(code),
            Err(Unreached::Down) => {
                match redirects_refused {
                    true => eprintln!(
                        "error: no coordinator of --coordinator took the write ({})",
                        why.join("; ")
                    ),
                    false => eprintln!("error: cannot reach a coordinator ({})", why.join("; ")),
                }
                return Err(EXIT_UNAVAILABLE);
            }
        };
        match on_leader(&mut c, |c| rpc(c, req.clone())).await {
            Ok(r) => return Ok((c, r)),
            Err(LeaderMiss::Exit(code)) => return Err(code),
            Err(LeaderMiss::RedirectRefused(refusal)) => {
                why.push(format!("{reached}: {refusal}"));
                redirects_refused = true;
                if after.split(',').all(|a| a.trim().is_empty()) {
                    eprintln!(
                        "error: no coordinator of --coordinator took the write ({})",
                        why.join("; ")
                    );
                    return Err(EXIT_UNAVAILABLE);
                }
                eprintln!(
                    "note: {reached} redirects to a leader that is not followed (below); trying the next --coordinator address"
                );
                rest = after;
            }
        }
    }
}

/// A command that asks the leader once: connects, runs `rpc` with `req` there, and
/// `render`s the answer, whose return is the exit code.
pub(super) async fn call_leader<Req, Resp, F, Fut>(
    addr: &str,
    req: Req,
    rpc: F,
    render: impl FnOnce(Resp) -> u8,
) -> u8
where
    Req: Clone,
    F: Fn(Client, Req) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    match ask_leader(addr, req, rpc).await {
        Ok((_, r)) => render(r),
        Err(code) => code,
    }
}

/// A client on the leader a follower's answer names (its metadata `flotilla-leader`: a
/// follower reads the control store, behind the leader's own state by the store's write
/// window, and without what only the leader holds, such as the shards a plan waits on);
/// None when the answer is the leader's, or the leader named does not answer.
pub(super) async fn leader_named_in(md: &tonic::metadata::MetadataMap) -> Option<Client> {
    let leader = md
        .get(flotilla_core::protocol::LEADER_METADATA)?
        .to_str()
        .ok()?;
    if leader == flotilla_core::protocol::NO_LEADER {
        eprintln!("{NO_LEADER_NOTE}");
        return None;
    }
    // A read stays with the follower's answer (over TLS, as asked) rather than follow a
    // redirect to plaintext; a write is refused (`on_leader`).
    if let Err(why) = super::transport::may_follow(leader) {
        eprintln!("warning: {why}; showing the follower's answer, read from the control store");
        return None;
    }
    if !reachable(leader).await {
        eprintln!(
            "note: read by a follower from the control store (the leader, {leader}, does not answer): it may be a few seconds behind"
        );
        return None;
    }
    client(leader).await.ok()
}

const NO_LEADER_NOTE: &str = "note: no coordinator leads now (etcd away, or an election under way): read from the control store, which may be behind the shards (a running plan's progress reaches it through a leader)";

/// Whether an answer says no coordinator leads now (its `flotilla-leader` is `none`).
fn says_no_leader(md: &tonic::metadata::MetadataMap) -> bool {
    md.get(flotilla_core::protocol::LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        == Some(flotilla_core::protocol::NO_LEADER)
}

/// A client on the first of `addrs` that answers a connection, saying nothing when none
/// does (the caller tries again).
pub(super) async fn quietly(addrs: &str) -> Option<Client> {
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        if reachable(addr).await
            && let Ok(c) = client(addr).await
        {
            return Some(c);
        }
    }
    None
}

/// A read of a plan: from the leader when a follower answered, or refused (a plan it has
/// not read from the store yet), and the leader answers (see [`leader_named_in`]); else the
/// follower's answer stands.
pub(super) async fn read_plan<Req, Resp, F, Fut>(
    addr: &str,
    req: Req,
    rpc: F,
    render: impl FnOnce(Resp) -> u8,
) -> u8
where
    Req: Clone,
    F: Fn(Client, Req) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    let c = match client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let answer = match rpc(c, req.clone()).await {
        Ok(r) => r,
        Err(e) => {
            return match leader_named_in(e.metadata()).await {
                Some(leader) => match rpc(leader, req).await {
                    Ok(r) => render(r.into_inner()),
                    Err(e) => fail(e),
                },
                None => fail(e),
            };
        }
    };
    // The coordinator asked knows no leader (it lost etcd, or an election is under way):
    // another listed one may lead, or know who does. Before, its store read stood with
    // "no coordinator leads now" for as long as it was cut off, the leader listed beside it.
    if says_no_leader(answer.metadata()) && addr.contains(',') {
        for other in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            // (quietly: one not answering is passed over)
            let Some(c) = quietly(other).await else {
                continue;
            };
            let Ok(r) = rpc(c, req.clone()).await else {
                continue;
            };
            if says_no_leader(r.metadata()) {
                continue;
            }
            match r.metadata().get(flotilla_core::protocol::LEADER_METADATA) {
                // the leader's own answer
                None => return render(r.into_inner()),
                // a follower that knows the leader: read there, if that one still leads
                // (a follower may name the one cut off until its lease runs out)
                Some(_) => {
                    if let Some(leader) = leader_named_in(r.metadata()).await
                        && let Ok(lr) = rpc(leader, req.clone()).await
                        && lr
                            .metadata()
                            .get(flotilla_core::protocol::LEADER_METADATA)
                            .is_none()
                    {
                        return render(lr.into_inner());
                    }
                }
            }
        }
    }
    if let Some(leader) = leader_named_in(answer.metadata()).await {
        match rpc(leader, req).await {
            Ok(r) => {
                // (the one named may have stopped leading since: its read is the store's)
                if says_no_leader(r.metadata()) {
                    eprintln!("{NO_LEADER_NOTE}");
                }
                return render(r.into_inner());
            }
            Err(e) => eprintln!(
                "note: the leader answered: {}; showing the follower's answer, read from the control store",
                e.message()
            ),
        }
    }
    render(answer.into_inner())
}

/// A read that any coordinator answers, a follower too: connects, runs `rpc` with `req`
/// on the first coordinator reached, and `render`s the answer, whose return is the exit
/// code.
pub(super) async fn call_any<Req, Resp, F, Fut>(
    addr: &str,
    req: Req,
    rpc: F,
    render: impl FnOnce(Resp) -> u8,
) -> u8
where
    F: FnOnce(Client, Req) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    let c = match client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match rpc(c, req).await {
        Ok(r) => render(r.into_inner()),
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::set_credential;

    /// A token file an editor saved with a byte-order mark is read as its token; one that
    /// holds nothing else is empty.
    #[test]
    fn a_token_file_with_a_byte_order_mark_is_read() {
        let dir = flotilla_testkit::TestDir::new("token-bom").unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "\u{feff}flt_0123456789abcdef\n").unwrap();
        assert_eq!(set_credential(Some(&file)), Ok(()));
        std::fs::write(&file, "\u{feff}\n").unwrap();
        let e = set_credential(Some(&file)).unwrap_err();
        assert!(e.contains("the file is empty"), "{e}");
        // a comment above the token was "not a token (not plain text)"
        std::fs::write(&file, "# alice, operator\nflt_0123456789abcdef\n").unwrap();
        assert_eq!(set_credential(Some(&file)), Ok(()));
        std::fs::write(&file, "# alice, operator\n\n").unwrap();
        let e = set_credential(Some(&file)).unwrap_err();
        assert!(
            e.ends_with("the file holds no token: only comments (#) and blank lines"),
            "{e}"
        );
    }
}
