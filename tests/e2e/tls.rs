//! Transport security: mTLS between the CLI, the agents and the coordinator, etcd over
//! TLS with client certificates and a user, agents' certificates naming their shard, and
//! plaintext kept to loopback. Certificates come from throwaway CAs made in the test.
use std::path::Path;

use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, TestFleet, WAIT};
use crate::ha::HaFleet;
use crate::harness::certs::{FleetCerts, env_refs};
use crate::harness::etcd::EtcdTls;
use crate::harness::{Etcd, FlotillaProcess, TestDir, free_port, http, run_flotilla, wait_until};
use flotilla_testkit::tls::{CertSpec, TestCa};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A plan of one tenant-scoped migration creating `table`.
fn plan(id: &str, table: &str) -> anyhow::Result<MigrationDir> {
    let d = MigrationDir::new()?;
    d.migration(
        id,
        "",
        &format!("CREATE TABLE {table} (x int);"),
        &format!("DROP TABLE {table};"),
    )?;
    Ok(d)
}

/// The whole audit trail.
async fn audit(fleet: &TestFleet) -> anyhow::Result<Vec<Value>> {
    let v = fleet.json(&["audit", "list", "--output", "json"]).await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn has_entry(trail: &[Value], action: &str, detail: &str) -> bool {
    trail
        .iter()
        .any(|e| e["action"] == action && e["detail"].as_str().is_some_and(|d| d.contains(detail)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_completes_over_mtls_everywhere_with_etcd_over_tls_and_a_user() -> anyhow::Result<()>
{
    // etcd serving clients over TLS only, client certificates required, auth on.
    let etcd_ca = TestCa::new("etcd")?;
    let etcd_server = etcd_ca.issue("etcd", &CertSpec::server("etcd"))?;
    let etcd_client = etcd_ca.issue("client", &CertSpec::client("etcd-client", &[]))?;
    let etcd = Etcd::start_tls(&EtcdTls {
        cert: etcd_server.cert.clone(),
        key: etcd_server.key.clone(),
        ca: etcd_ca.ca_path(),
    })
    .await?;
    assert!(
        etcd.endpoint().starts_with("https://"),
        "{}",
        etcd.endpoint()
    );
    etcd.enable_auth(
        Some((&etcd_ca.ca_path(), &etcd_client)),
        "flotilla",
        "etcd-secret-pw",
        "/flotilla",
    )
    .await?;
    let files = TestDir::new("etcd-password")?;
    let password_file = files.join("etcd-password");
    std::fs::write(&password_file, "etcd-secret-pw\n")?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let etcd_args = [
        "--etcd".to_string(),
        etcd.endpoint(),
        "--etcd-ca".into(),
        s(&etcd_ca.ca_path()),
        "--etcd-cert".into(),
        s(&etcd_client.cert),
        "--etcd-key".into(),
        s(&etcd_client.key),
        "--etcd-user".into(),
        "flotilla".into(),
        "--etcd-password-file".into(),
        s(&password_file),
    ];
    let etcd_args: Vec<&str> = etcd_args.iter().map(String::as_str).collect();

    // Without the etcd user, etcd refuses the coordinator (its certificate's common name
    // is no etcd user): it does not start.
    let bare = run_flotilla(
        &[
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--store",
            &s(&files.join("bare.db")),
            "--etcd",
            &etcd.endpoint(),
            "--etcd-ca",
            &s(&etcd_ca.ca_path()),
            "--etcd-cert",
            &s(&etcd_client.cert),
            "--etcd-key",
            &s(&etcd_client.key),
        ],
        &[],
    )
    .await?;
    assert!(!bare.success(), "{bare}");
    assert!(bare.stderr.contains("permission denied"), "{bare}");

    // Probes without a certificate get the health service alone, in plaintext, on a port
    // of its own.
    let health_addr = format!("127.0.0.1:{}", free_port());
    let mut coordinator_args = etcd_args.clone();
    coordinator_args.extend(["--health-listen", health_addr.as_str()]);
    let fleet = TestFleet::builder(2, 2)
        .tls()
        .coordinator_args(&coordinator_args)
        .agent_args(&etcd_args)
        .start()
        .await?;
    assert!(fleet.addr.starts_with("https://"), "{}", fleet.addr);
    let health_url = format!("http://{health_addr}");
    for service in ["", "flotilla.v1.OperatorService"] {
        assert_eq!(
            plaintext_health(&health_url, service).await?,
            ServingStatus::Serving,
            "`{service}` on the health-only port"
        );
    }
    // ... and nothing else there: the operator service is not served on it.
    let channel = tonic::transport::Channel::from_shared(health_url.clone())?
        .connect()
        .await?;
    let refused = flotilla_core::pb::operator_service_client::OperatorServiceClient::new(channel)
        .list_plans(flotilla_core::pb::ListPlansRequest::default())
        .await
        .expect_err("the health-only port serves no operator RPC");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused}");
    // The CLI pointed there says what it reached (it printed `error: ` and nothing else).
    let out = run_flotilla(&["--coordinator", &health_url, "plan", "list"], &[]).await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(
        out.stderr
            .contains("does not serve Flotilla's operator service (UNIMPLEMENTED)"),
        "{out}"
    );
    let coordinator_log = fleet.coordinator.as_ref().unwrap().log();
    assert!(
        coordinator_log.contains("coordination backend: etcd"),
        "{coordinator_log}"
    );
    assert!(
        !coordinator_log.contains("etcd-secret-pw"),
        "the etcd password is not logged"
    );
    // The agents reach etcd the same way: their liveness keys are there.
    for agent in fleet.agents.iter().flatten() {
        agent.wait_for_log("liveness key put in etcd", WAIT).await?;
        assert!(!agent.log().contains("etcd-secret-pw"));
    }

    // The CLI over mTLS: submit and wait; the agents apply it over mTLS.
    let dir = plan("001_tls", "over_tls")?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(
        fleet.journal_total().await?,
        4,
        "two tenants on each of two shards"
    );

    // etcd forgets every token it issued (what their expiry does, 5 minutes idle by
    // default): the coordinator and the agents authenticate again on their next request,
    // and an atomic plan (its plan lock, its decision, the agents' reads of the decision)
    // completes.
    etcd.invalidate_auth_tokens(Some((&etcd_ca.ca_path(), &etcd_client)), "etcd-secret-pw")
        .await?;
    let dir = plan("002_tls_atomic", "after_new_tokens")?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &["--atomic"]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(fleet.journal_total().await?, 8, "both plans everywhere");

    // Plaintext to the TLS port does not get through: the server answers an HTTP/2
    // client's preface with at most a TLS alert, and closes. (Asked at the socket, not
    // through the CLI: a gRPC channel reconnects when its connection is cut, so how
    // long the CLI takes to give up is its own matter, not the server's.)
    let port = fleet
        .addr
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/');
    let reply = plaintext_h2_reply(&format!("127.0.0.1:{port}")).await?;
    assert!(
        reply.is_empty() || reply[0] == 0x15,
        "a plaintext HTTP/2 client got {reply:02x?} from the TLS port"
    );
    Ok(())
}

/// The health service's status for `service`, asked in plaintext at `url`.
async fn plaintext_health(url: &str, service: &str) -> anyhow::Result<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(url.to_string())?
        .connect()
        .await?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await?
        .into_inner();
    Ok(reply.status())
}

/// What a TLS listener sends back to an HTTP/2 client's plaintext preface and SETTINGS
/// frame, read until it closes the connection.
async fn plaintext_h2_reply(addr: &str) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    let mut reply = Vec::new();
    // the server closes at once; the bound only keeps a broken server from hanging the test
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut reply))
        .await
        .map_err(|_| anyhow::anyhow!("the TLS port kept a plaintext connection open"))?;
    match read {
        Ok(_) => Ok(reply),
        // closed with our bytes unread: a reset, which is a refusal too
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(reply),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_certificates_are_refused_audited_and_change_nothing() -> anyhow::Result<()> {
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    // shard_2's agent has a certificate without a URI SAN: its common name is mapped.
    let files = TestDir::new("identities")?;
    let identities = files.join("agent-identities.toml");
    std::fs::write(&identities, "\"db-host-2.internal\" = \"shard_2\"\n")?;
    let fleet = TestFleet::builder(1, 1)
        .metrics(metrics)
        .tls()
        .coordinator_args(&["--agent-identities", &identities.to_string_lossy()])
        .start()
        .await?;
    let certs: &FleetCerts = fleet.tls.as_ref().unwrap();
    let ca = certs.ca.ca_path().to_string_lossy().into_owned();
    let plans_before = fleet.json(&["plan", "list", "--output", "json"]).await?;

    // Operator commands with no certificate, one from a foreign CA, an expired one.
    let foreign_ca = TestCa::new("foreign")?;
    let foreign = foreign_ca.issue("mallory", &CertSpec::client("mallory", &[]))?;
    let expired = certs
        .ca
        .issue("expired", &CertSpec::client("bob", &[]).expired())?;
    let dir = plan("001_refused", "refused")?;
    let path = dir.path().to_string_lossy().into_owned();
    let submit = [
        "--coordinator",
        fleet.addr.as_str(),
        "plan",
        "submit",
        &path,
    ];
    let no_cert = run_flotilla(&submit, &[("FLOTILLA_TLS_CA", &ca)]).await?;
    assert!(!no_cert.success(), "{no_cert}");
    assert!(
        no_cert
            .stderr
            .contains("may have refused this client's certificate"),
        "{no_cert}"
    );
    // Plaintext to this TLS coordinator: the call breaks, and the hint names TLS.
    let plaintext = fleet.addr.replacen("https://", "http://", 1);
    let out = run_flotilla(&["--coordinator", &plaintext, "plan", "list"], &[]).await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(
        out.stderr.contains("If the coordinator serves TLS, use"),
        "{out}"
    );
    // A broken call is also what a coordinator killed while it answered leaves: the hint
    // does not let that pass for a refusal (the command may have been stored).
    assert!(
        out.stderr
            .contains("the command may or may not have taken effect; look"),
        "{out}"
    );
    for (what, files) in [("foreign CA", &foreign), ("expired", &expired)] {
        let env = certs.client_env(files);
        let out = run_flotilla(&submit, &env_refs(&env)).await?;
        assert!(!out.success(), "{what}: {out}");
    }
    // the expired one says so itself first, naming its file and when (it read "connection
    // closed" alone); the coordinator refuses it all the same, and audits it (below)
    let out = run_flotilla(&submit, &env_refs(&certs.client_env(&expired))).await?;
    assert!(
        out.stderr.contains("warning: --tls-cert ")
            && out.stderr.contains("expired.pem")
            && out.stderr.contains("(CN=bob) expired ")
            && out.stderr.contains("the coordinator refuses it; renew it"),
        "{out}"
    );

    // An agent holding shard_0's certificate that says it is shard_1 (a database of its
    // own, so only the certificate is wrong).
    fleet.pg.create_database("shard_1").await?;
    let dsn = fleet.pg.url("shard_1");
    let env = certs.client_env(&certs.agent(&fleet.shards[0])?);
    let agent_args = [
        "--coordinator",
        fleet.addr.as_str(),
        "agent",
        "--shard",
        "shard_1",
        "--dsn",
        &dsn,
    ];
    // Its certificate names shard_0 (a URI SAN): refused at start, before it claims the
    // database as shard_1 (it did, and the agent started next with the right name there
    // was refused by the database).
    let out = run_flotilla(&agent_args, &env_refs(&env)).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(
            "--tls-cert names shard shard_0 (its flotilla-agent: URI SAN), and this agent is --shard shard_1"
        ),
        "{out}"
    );
    let claimed: i64 = fleet
        .pg
        .query_scalar(
            "shard_1",
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'flotilla'",
        )
        .await?;
    assert_eq!(claimed, 0, "the database was not touched");
    // One certificate naming two shards, its own among them: refused at the agent's start
    // (and by the coordinator: `identity`'s unit test), where it attached as either.
    let both = certs.ca.issue(
        "agent-two-shards",
        &CertSpec::client(
            "agent-two-shards",
            &["flotilla-agent:shard_1", "flotilla-agent:shard_9"],
        ),
    )?;
    let env = certs.client_env(&both);
    let out = run_flotilla(&agent_args, &env_refs(&env)).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("--tls-cert names several shards (shard_1, shard_9"),
        "{out}"
    );
    // A certificate that names its shard by common name only (--agent-identities maps
    // db-host-2.internal to shard_2): the agent cannot tell, the coordinator refuses it.
    let host_2 = certs.ca.issue(
        "db-host-2-impostor",
        &CertSpec::client("db-host-2.internal", &[]),
    )?;
    let env = certs.client_env(&host_2);
    let impostor = FlotillaProcess::spawn(&agent_args, &env_refs(&env))?;
    impostor
        .wait_for_log("may not attach as shard shard_1", WAIT)
        .await?;
    assert!(
        impostor
            .log()
            .contains("The caller does not have permission"),
        "refused with PERMISSION_DENIED: {}",
        impostor.log()
    );
    // Agents whose certificates the handshake refuses say why (their log said "operation
    // was canceled", the alert buried after it).
    for (i, (files, says)) in [
        (
            &expired,
            "the coordinator refused this agent's certificate: it has expired",
        ),
        (
            &foreign,
            "the coordinator refused this agent's certificate: it is not signed by the CA the coordinator trusts",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        // (a database each: the impostor above still holds shard_1's)
        let shard = format!("refused_{i}");
        fleet.pg.create_database(&shard).await?;
        let env = certs.client_env(files);
        let refused = FlotillaProcess::spawn(
            &[
                "--coordinator",
                &fleet.addr,
                "agent",
                "--shard",
                &shard,
                "--dsn",
                &fleet.pg.url(&shard),
            ],
            &env_refs(&env),
        )?;
        refused.wait_for_log(says, WAIT).await?;
    }

    // Each refusal is in the audit trail, with where it came from.
    wait_until("the refusals audited", WAIT, async || {
        let trail = audit(&fleet).await?;
        Ok(has_entry(&trail, "tls-refused", "no client certificate")
            && has_entry(&trail, "tls-refused", "UnknownIssuer")
            && has_entry(&trail, "tls-refused", "certificate expired")
            && has_entry(
                &trail,
                "agent-refused",
                "shard shard_2's; it may not attach as shard shard_1",
            ))
    })
    .await?;
    let body = http::get(metrics, "/metrics").await?.body;
    for (reason, at_least) in [
        ("no_certificate", 1),
        ("bad_certificate", 2),
        ("wrong_shard", 1),
    ] {
        let line = format!("flotilla_connections_refused_total{{reason=\"{reason}\"}} ");
        let count: u64 = body
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_default();
        assert!(count >= at_least, "{reason}: {count}\n{body}");
    }
    // The impostor keeps retrying: each try is counted, the same refusal from the same
    // host is written to the audit trail once in a while (it cannot fill the store).
    wait_until("the impostor refused again", WAIT, async || {
        Ok(impostor
            .log()
            .matches("may not attach as shard shard_1")
            .count()
            >= 2)
    })
    .await?;
    let trail = audit(&fleet).await?;
    let refusals: Vec<&Value> = trail
        .iter()
        .filter(|e| e["action"] == "agent-refused")
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    let refusal = refusals[0];
    assert_eq!(
        refusal["actor"], "certificate db-host-2.internal",
        "{refusal}"
    );
    assert!(
        refusal["detail"]
            .as_str()
            .unwrap()
            .contains("from 127.0.0.1:"),
        "{refusal}"
    );

    // Nothing changed: no plan, no agent row for shard_1, shard_0 still attached alone.
    let plans_after = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(plans_before, plans_after);
    let agents = fleet.json(&["fleet", "list", "--output", "json"]).await?;
    let shards: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["shard"].as_str())
        .collect();
    assert_eq!(shards, vec!["shard_0"], "{agents}");
    assert_eq!(fleet.journal_total().await?, 0);

    // A certificate whose common name the mapping gives shard_2 attaches as shard_2.
    fleet.pg.create_database("shard_2").await?;
    let mapped = certs
        .ca
        .issue("db-host-2", &CertSpec::client("db-host-2.internal", &[]))?;
    let env = certs.client_env(&mapped);
    let dsn = fleet.pg.url("shard_2");
    let _mapped_agent = FlotillaProcess::spawn(
        &[
            "--coordinator",
            &fleet.addr,
            "agent",
            "--shard",
            "shard_2",
            "--dsn",
            &dsn,
        ],
        &env_refs(&env),
    )?;
    fleet.wait_attached(2).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn over_mtls_a_follower_sends_the_cli_and_agents_to_the_leader() -> anyhow::Result<()> {
    let mut fleet = HaFleet::builder(2, 1, 1).tls().start().await?;
    assert!(fleet.addrs.iter().all(|a| a.starts_with("https://")));
    let leader = fleet.leader().expect("one coordinator leads");
    let follower = 1 - leader;

    // A write sent to the follower goes to the leader's advertised https:// address.
    let dir = plan("001_ha_tls", "ha_over_tls")?;
    let path = dir.path().to_string_lossy().into_owned();
    let out = fleet
        .cli_at(
            follower,
            &["plan", "submit", &path, "--wait", "--output", "json"],
        )
        .await?;
    assert!(out.success(), "{out}");
    assert_eq!(out.last_json()?["state"], "completed", "{out}");

    // The leader dies: the agent attaches to the other coordinator over mTLS, and a
    // plan completes there.
    fleet.coordinators[leader].take().unwrap().kill()?;
    fleet.wait_connected(1).await?;
    let dir = plan("002_ha_tls", "after_failover")?;
    let path = dir.path().to_string_lossy().into_owned();
    let out = fleet
        .cli(&["plan", "submit", &path, "--wait", "--output", "json"])
        .await?;
    assert!(out.success(), "{out}");
    assert_eq!(out.last_json()?["state"], "completed", "{out}");
    Ok(())
}

/// A follower names the leader by the leader's key in etcd (its `--advertise`). Once that
/// says `http://` (a mis-set `--advertise`, or the key overwritten, as here), a CLI and an
/// agent holding TLS files refuse the redirect, naming the address and where it came from,
/// and send nothing there: the CLI followed it in plaintext with the operator's token and
/// the plan, and the agent opened its stream in plaintext.
#[tokio::test(flavor = "multi_thread")]
async fn under_tls_a_redirect_to_a_plaintext_leader_is_refused() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let fleet = HaFleet::builder(2, 1, 1).tls().start().await?;
    let leader = fleet.leader().expect("one coordinator leads");
    let follower = 1 - leader;
    // A plaintext port that counts the connections it gets.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let trap_addr = format!("http://{}", trap.local_addr()?);
    let reached = Arc::new(AtomicUsize::new(0));
    let counted = reached.clone();
    tokio::spawn(async move {
        while let Ok((_connection, _)) = trap.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    // The leader's key (its lease kept) now names the trap; the follower reads it.
    let election =
        flotilla_core::protocol::keys::election(flotilla_core::protocol::keys::DEFAULT_PREFIX);
    fleet.etcd.overwrite_leader(&election, &trap_addr).await?;
    fleet.coordinators[follower]
        .as_ref()
        .unwrap()
        .wait_for_log(&trap_addr, WAIT)
        .await?;

    // A write sent to the follower: refused (exit 3: the leader cannot be reached as it
    // must be), naming the address and the redirect.
    let dir = plan("001_no_downgrade", "no_downgrade")?;
    let path = dir.path().to_string_lossy().into_owned();
    let out = fleet.cli_at(follower, &["plan", "submit", &path]).await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "a follower's redirect names the leader at {trap_addr} (read from the leader's key in etcd"
        )) && out.stderr.contains("which is not https://"),
        "{out}"
    );

    // Given the follower and then the leader, the CLI goes on past the refused redirect to
    // the next address it was given, and the write lands there (it gave up at the first).
    let env = fleet.cli_env();
    let listed = format!("{},{}", fleet.addrs[follower], fleet.addrs[leader]);
    let out = run_flotilla(
        &["--coordinator", &listed, "plan", "submit", &path],
        &env_refs(&env),
    )
    .await?;
    assert!(out.success(), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "note: {} redirects to a leader that is not followed (below); trying the next --coordinator address",
            fleet.addrs[follower]
        )),
        "{out}"
    );
    // None of the list takes it: exit 3, the error naming each address and why.
    let dead = format!("https://127.0.0.1:{}", free_port());
    let listed = format!("{},{dead}", fleet.addrs[follower]);
    let out = run_flotilla(
        &["--coordinator", &listed, "plan", "submit", &path],
        &env_refs(&env),
    )
    .await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "error: no coordinator of --coordinator took the write ({}: a follower's redirect names the leader at {trap_addr}",
            fleet.addrs[follower]
        )) && out.stderr.contains(&format!("; {dead}: ")),
        "{out}"
    );

    // An agent that knows only the follower: refused there, it does not follow either.
    fleet.pg.create_database("shard_1").await?;
    let certs = fleet.tls.as_ref().unwrap();
    let env = certs.client_env(&certs.agent("shard_1")?);
    let dsn = fleet.pg.url("shard_1");
    let agent = FlotillaProcess::spawn(
        &[
            "--coordinator",
            &fleet.addrs[follower],
            "agent",
            "--shard",
            "shard_1",
            "--dsn",
            &dsn,
        ],
        &env_refs(&env),
    )?;
    agent
        .wait_for_log(
            &format!("redirected the agent to the leader at {trap_addr} (read from the leader's key in etcd"),
            WAIT,
        )
        .await?;
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "something connected to the plaintext address a redirect named"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_off_loopback_needs_insecure_spelled_out() -> anyhow::Result<()> {
    let dir = TestDir::new("insecure")?;
    let store = dir.join("flotilla.db").to_string_lossy().into_owned();
    let listen = format!("0.0.0.0:{}", free_port());
    let out = run_flotilla(
        &["coordinator", "--listen", &listen, "--store", &store],
        &[],
    )
    .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--insecure"), "{out}");
    assert!(out.stderr.contains(&listen), "{out}");

    let coordinator = FlotillaProcess::spawn(
        &[
            "coordinator",
            "--listen",
            &listen,
            "--store",
            &store,
            "--insecure",
        ],
        &[],
    )?;
    coordinator
        .wait_for_log("coordinator listening", WAIT)
        .await?;
    assert!(
        coordinator.log().contains("serving gRPC in plaintext"),
        "{}",
        coordinator.log()
    );
    // SIGHUP (`systemctl reload`, a closed terminal) ends it no more without TLS than with
    // it (the signal's default action did): it is taken, and the CLI below still reaches it.
    coordinator.signal(libc::SIGHUP)?;
    coordinator
        .wait_for_log("reload requested: no TLS files to read again", WAIT)
        .await?;

    // A coordinator started on `store` with `tls` flags: its output.
    let start = async |tls: &[&str]| {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["coordinator", "--listen", &listen, "--store", &store];
        args.extend_from_slice(tls);
        run_flotilla(&args, &[]).await
    };
    // A CA without a certificate for the server is refused, naming the flags.
    let ca = TestCa::new("lonely")?;
    let ca_path = ca.ca_path().to_string_lossy().into_owned();
    let out = start(&["--tls-ca", &ca_path]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--tls-cert"), "{out}");

    // An expired server certificate is refused at start, naming the file and when it
    // expired (it served, said SERVING, and every client failed).
    let old = ca.issue("old-server", &CertSpec::server("coordinator").expired())?;
    let (cert, key) = (old.cert.to_string_lossy(), old.key.to_string_lossy());
    let out = start(&["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca_path]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("--tls-cert") && out.stderr.contains("expired"),
        "{out}"
    );

    // TLS without --tls-ca off loopback: it serves, and says that it authenticates no client
    // (agents attach as whatever shard they say).
    let server = ca.issue("server", &CertSpec::server("coordinator"))?;
    let (cert, key) = (server.cert.to_string_lossy(), server.key.to_string_lossy());
    let other = TestDir::new("tls-no-ca")?;
    let other_store = other.join("flotilla.db").to_string_lossy().into_owned();
    let open = FlotillaProcess::spawn(
        &[
            "coordinator",
            "--listen",
            &format!("0.0.0.0:{}", free_port()),
            "--store",
            &other_store,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &[],
    )?;
    open.wait_for_log("coordinator listening", WAIT).await?;
    assert!(
        open.log().contains("serving TLS without --tls-ca"),
        "{}",
        open.log()
    );

    // The CLI to this plaintext coordinator: a bare HOST:PORT is http:// and works; TLS
    // to it fails at the handshake, saying the other end spoke plaintext.
    let port = listen.rsplit(':').next().unwrap();
    let bare = format!("127.0.0.1:{port}");
    let out = run_flotilla(&["--coordinator", &bare, "plan", "list"], &[]).await?;
    assert!(out.success(), "{out}");
    let out = run_flotilla(
        &["--coordinator", &format!("https://{bare}"), "plan", "list"],
        &[("FLOTILLA_TLS_CA", &ca_path)],
    )
    .await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(
        out.stderr.contains("answered in plaintext, not TLS"),
        "{out}"
    );
    Ok(())
}

/// The shard's PostgreSQL over TLS: an agent whose DSN says `sslmode=verify-full` with the
/// server's CA reaches it encrypted (`pg_stat_ssl`) and runs a plan; one given another CA,
/// or asking TLS of a server without it, stops at once naming the TLS failure (the driver
/// was built without TLS: every such DSN retried "not reachable" for good).
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_reaches_its_shard_over_verified_tls_and_a_wrong_ca_stops_it() -> anyhow::Result<()>
{
    let ca = TestCa::new("postgres-server")?;
    let server = ca.issue("postgres", &CertSpec::server("postgres"))?;
    // PostgreSQL reads its key as its own user and refuses one that others may read.
    if flotilla_testkit::running_as_root() {
        let (uid, gid) = flotilla_testkit::postgres_os_user()?;
        for file in [&server.cert, &server.key] {
            std::os::unix::fs::chown(file, Some(uid), Some(gid))?;
        }
    }
    std::fs::set_permissions(
        &server.key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let cert = server.cert.to_string_lossy().into_owned();
    let key = server.key.to_string_lossy().into_owned();
    let mut fleet = TestFleet::builder(1, 2)
        .pg_setting("ssl", "on")
        .pg_setting("ssl_cert_file", &cert)
        .pg_setting("ssl_key_file", &key)
        .start()
        .await?;
    fleet.agents[0].take().expect("agent 0").kill()?;
    let verified = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        fleet.agent_dsn(0),
        ca.ca_path().display()
    );
    let agent = fleet.spawn_agent_on(0, &verified)?;
    fleet.agents[0] = Some(agent);
    fleet.wait_attached(1).await?;
    let d = plan("20250601000000_over_tls", "over_tls")?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(
        (code, status["state"].as_str()),
        (0, Some("completed")),
        "{out}"
    );
    let plaintext: i64 = fleet
        .pg
        .query_scalar(
            "shard_0",
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'flotilla-agent' AND NOT s.ssl",
        )
        .await?;
    let encrypted: i64 = fleet
        .pg
        .query_scalar(
            "shard_0",
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'flotilla-agent' AND s.ssl",
        )
        .await?;
    assert_eq!(plaintext, 0);
    assert!(
        encrypted >= 1,
        "the agent's connections: {encrypted} over TLS"
    );

    // Another CA: the server's certificate is refused, and the agent says so and stops.
    let other = TestCa::new("someone-else")?;
    let wrong = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        fleet.agent_dsn(0),
        other.ca_path().display()
    );
    let out = run_flotilla(
        &[
            "--coordinator",
            &fleet.addr,
            "agent",
            "--shard",
            "shard_0",
            "--dsn",
            &wrong,
            "--tenant-pattern",
            "tenant_%",
        ],
        &[],
    )
    .await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("shard_0"), "{out}");
    assert!(
        out.stderr.to_lowercase().contains("tls") || out.stderr.contains("certificate"),
        "{out}"
    );
    assert!(!out.stderr.contains("retrying"), "{out}");
    Ok(())
}

/// The value of the one series `name` (no labels) in a scrape.
fn gauge(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Certificates rotate without a restart: at SIGHUP the coordinator reads its TLS files
/// again and serves new handshakes with them; files that would not do (a key of another
/// certificate, a file gone) change nothing and are named in an error. A certificate that
/// expires while it runs is warned about before, shown in
/// `flotilla_tls_certificate_expiry_timestamp_seconds`, and makes `/readyz` not ready,
/// naming it, until a renewed one is loaded. The agent reloads its own on SIGHUP too, and
/// neither process dies of the signal (its default action ended them).
#[tokio::test(flavor = "multi_thread")]
async fn certificates_reload_on_sighup_and_an_expiring_one_is_said() -> anyhow::Result<()> {
    const EXPIRY: &str = "flotilla_tls_certificate_expiry_timestamp_seconds";
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let fleet = TestFleet::builder(1, 1)
        .metrics(metrics)
        .tls()
        .start()
        .await?;
    let certs: &FleetCerts = fleet.tls.as_ref().unwrap();
    let coordinator = fleet.coordinator.as_ref().unwrap();
    let readyz = async || http::get(metrics, "/readyz").await;
    wait_until("the coordinator ready", WAIT, async || {
        Ok(readyz().await?.status == 200)
    })
    .await?;
    let body = http::get(metrics, "/metrics").await?.body;
    assert_eq!(
        gauge(&body, EXPIRY),
        Some(certs.server.not_after as f64),
        "{body}"
    );
    // (what a reload reads: the same paths, new contents)
    let install = |from: &flotilla_testkit::tls::CertFiles| -> anyhow::Result<()> {
        std::fs::copy(&from.cert, &certs.server.cert)?;
        std::fs::copy(&from.key, &certs.server.key)?;
        Ok(())
    };

    // A certificate that expires in a few seconds, put in place of the coordinator's.
    let soon = certs.ca.issue(
        "soon",
        &CertSpec::server("coordinator-soon").valid_for(std::time::Duration::from_secs(12)),
    )?;
    install(&soon)?;
    coordinator.signal(libc::SIGHUP)?;
    coordinator
        .wait_for_log(
            "new connections are served the certificate CN=coordinator-soon",
            WAIT,
        )
        .await?;
    // warned at once: it expires within 14 days
    coordinator
        .wait_for_log(
            &format!(
                "the serving certificate (--tls-cert {}, CN=coordinator-soon) expires ",
                certs.server.cert.display()
            ),
            WAIT,
        )
        .await?;
    let body = http::get(metrics, "/metrics").await?.body;
    assert_eq!(gauge(&body, EXPIRY), Some(soon.not_after as f64), "{body}");
    // new handshakes get it (the CLI checks it against the CA)
    let out = fleet.cli(&["plan", "list"]).await?;
    assert!(out.success(), "{out}");

    // It expires: /readyz says not ready, naming it; clients refuse it.
    wait_until(
        "/readyz not ready for the expired certificate",
        WAIT,
        async || Ok(readyz().await?.status == 503),
    )
    .await?;
    let r = readyz().await?;
    assert!(
        r.body.contains(&format!(
            "not ready: the serving certificate (--tls-cert {}, CN=coordinator-soon) expired ",
            certs.server.cert.display()
        )),
        "{}",
        r.body
    );
    let out = fleet.cli(&["plan", "list"]).await?;
    assert!(!out.success(), "{out}");

    // Bad files at a reload change nothing, and say which file and what is wrong: a key of
    // another certificate, then a key file gone.
    let other = certs
        .ca
        .issue("other", &CertSpec::server("coordinator-other"))?;
    let renewed = certs
        .ca
        .issue("renewed", &CertSpec::server("coordinator-renewed"))?;
    std::fs::copy(&renewed.cert, &certs.server.cert)?;
    std::fs::copy(&other.key, &certs.server.key)?;
    coordinator.signal(libc::SIGHUP)?;
    coordinator
        .wait_for_log(
            "reloading the TLS files failed, nothing changed: still serving the certificate CN=coordinator-soon",
            WAIT,
        )
        .await?;
    let log = coordinator.log();
    assert!(
        log.contains(&format!(
            "--tls-cert {} and --tls-key {} do not go together",
            certs.server.cert.display(),
            certs.server.key.display()
        )),
        "{log}"
    );
    std::fs::remove_file(&certs.server.key)?;
    coordinator.signal(libc::SIGHUP)?;
    coordinator
        .wait_for_log(
            &format!(
                "--tls-key {}: No such file or directory",
                certs.server.key.display()
            ),
            WAIT,
        )
        .await?;
    assert_eq!(readyz().await?.status, 503);
    let body = http::get(metrics, "/metrics").await?.body;
    assert_eq!(gauge(&body, EXPIRY), Some(soon.not_after as f64), "{body}");

    // A renewed certificate: served, ready again, the metric moves; the process lived
    // through every SIGHUP.
    install(&renewed)?;
    coordinator.signal(libc::SIGHUP)?;
    coordinator
        .wait_for_log(
            "new connections are served the certificate CN=coordinator-renewed",
            WAIT,
        )
        .await?;
    wait_until("the coordinator ready again", WAIT, async || {
        Ok(readyz().await?.status == 200)
    })
    .await?;
    let body = http::get(metrics, "/metrics").await?.body;
    assert_eq!(
        gauge(&body, EXPIRY),
        Some(renewed.not_after as f64),
        "{body}"
    );
    let dir = plan("001_after_rotation", "after_rotation")?;
    let path = dir.path().to_string_lossy().into_owned();
    let out = fleet
        .cli(&["plan", "submit", &path, "--wait", "--output", "json"])
        .await?;
    assert!(out.success(), "{out}");
    assert_eq!(out.last_json()?["state"], "completed", "{out}");

    // The agent reads its own files again on SIGHUP, and lives on.
    let agent = fleet.agents[0].as_ref().unwrap();
    agent.signal(libc::SIGHUP)?;
    agent
        .wait_for_log(
            "TLS files reloaded: the next connection to a coordinator uses them",
            WAIT,
        )
        .await?;
    let mut fleet = fleet;
    assert!(fleet.coordinator.as_mut().unwrap().is_running());
    assert!(fleet.agents[0].as_mut().unwrap().is_running());
    Ok(())
}
