//! Operator identities: bearer tokens from `flotilla operator add` (the first admin
//! written straight into the control store), the role each RPC needs, refusals
//! (UNAUTHENTICATED, PERMISSION_DENIED) that change nothing and are audited with who,
//! what and from where, and identities that win over `--as` in the audit trail and in
//! approvals. Every other e2e test runs with authentication off (no operator in its store).
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, TestFleet, WAIT};
use crate::harness::{CommandOutput, TestDir, wait_until};

/// Production plans need one approval from a DBA; staging none.
const MATRIX: &str = r#"[[rule]]
environment = "staging"
risk = "*"
approvals = 0

[[rule]]
environment = "production"
risk = "*"
approvals = 1
roles = ["dba"]
"#;

/// A plan of one tenant-scoped migration creating `table`, in `environment`, with
/// `plan_extra` appended to its plan.toml.
fn plan(
    environment: &str,
    id: &str,
    table: &str,
    plan_extra: &str,
) -> anyhow::Result<MigrationDir> {
    MigrationDir::one_table(environment, id, table, plan_extra, "")
}

/// The fleet's command line as one operator: `--token-file FILE` first.
struct As<'a> {
    fleet: &'a TestFleet,
    token: PathBuf,
}

impl As<'_> {
    async fn cli(&self, args: &[&str]) -> anyhow::Result<CommandOutput> {
        let token = self.token.to_string_lossy().into_owned();
        let mut all = vec!["--token-file", token.as_str()];
        all.extend_from_slice(args);
        self.fleet.cli(&all).await
    }
}

impl Cli for As<'_> {
    async fn cli(&self, args: &[&str]) -> anyhow::Result<CommandOutput> {
        As::cli(self, args).await
    }
}

/// `operator add NAME --role ROLE [extra]` as `admin`, the token written to a file.
async fn add(
    admin: &As<'_>,
    files: &Path,
    name: &str,
    role: &str,
    extra: &[&str],
) -> anyhow::Result<PathBuf> {
    let token = files.join(format!("{name}.token"));
    let t = token.to_string_lossy().into_owned();
    let mut args = vec!["operator", "add", name, "--role", role, "--token-out", &t];
    args.extend_from_slice(extra);
    let out = admin.cli(&args).await?;
    assert!(out.success(), "{out}");
    assert!(
        !out.stdout.contains("flotilla_"),
        "the token is not printed: {out}"
    );
    Ok(token)
}

/// Operator `name` put straight into the control store `store` (`operator add --store`),
/// its token written to `token`.
async fn stored_operator(store: &str, name: &str, role: &str, token: &Path) -> anyhow::Result<()> {
    let out = crate::harness::run_flotilla(
        &[
            "operator",
            "add",
            name,
            "--role",
            role,
            "--store",
            store,
            "--token-out",
            &token.to_string_lossy(),
        ],
        &[],
    )
    .await?;
    assert!(out.success(), "{out}");
    Ok(())
}

/// The first admin, `root`, put straight into the fleet's control store (`operator add
/// --store`), its token in `files`.
async fn first_admin<'a>(fleet: &'a TestFleet, files: &Path) -> anyhow::Result<As<'a>> {
    let token = files.join("root.token");
    stored_operator(&fleet.store, "root", "admin", &token).await?;
    Ok(As { fleet, token })
}

fn refused(out: &CommandOutput, says: &str) {
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains(says), "expected `{says}`: {out}");
}

/// Audit rows of `action` (every plan, as `audit list` prints them).
async fn audited(viewer: &As<'_>, action: &str) -> anyhow::Result<Vec<Value>> {
    let all = viewer.json(&["audit", "list", "--output", "json"]).await?;
    Ok(all
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["action"] == action)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_roles_guard_every_operator_rpc_and_refusals_change_nothing()
-> anyhow::Result<()> {
    let files = TestDir::new("auth")?;
    let matrix = files.join("approvals.toml");
    std::fs::write(&matrix, MATRIX)?;
    let matrix = matrix.to_string_lossy().into_owned();
    let fleet = TestFleet::builder(2, 1)
        .coordinator_args(&["--approvals", &matrix])
        .start()
        .await?;
    let log = fleet.coordinator.as_ref().unwrap().log();
    assert!(log.contains("operator authentication is off"), "{log}");

    // With authentication off, nobody can make themselves the first admin over the network.
    let out = fleet
        .cli(&["operator", "add", "eve", "--role", "admin"])
        .await?;
    refused(&out, "no operator exists yet");

    // The first admin goes straight into the store; from then on every request authenticates.
    let root = first_admin(&fleet, files.path()).await?;
    let out = fleet.cli(&["plan", "list"]).await?;
    refused(&out, "unauthenticated: no credential");
    let out = fleet.cli(&["env", "status"]).await?;
    refused(&out, "unauthenticated: no credential");

    let alice = As {
        token: add(&root, files.path(), "alice", "operator", &[]).await?,
        fleet: &fleet,
    };
    let val = As {
        token: add(&root, files.path(), "val", "viewer", &[]).await?,
        fleet: &fleet,
    };
    // A token file already there refuses the add before the operator exists (it was added,
    // and its token, shown only once, lost), and leaves the file as it was.
    let taken = val.token.to_string_lossy().into_owned();
    let before = std::fs::read_to_string(&val.token)?;
    let out = root
        .cli(&[
            "operator",
            "add",
            "tim",
            "--role",
            "viewer",
            "--token-out",
            &taken,
        ])
        .await?;
    refused(&out, "no operator was added");
    assert_eq!(std::fs::read_to_string(&val.token)?, before);
    let listed = root.json(&["operator", "list", "--output", "json"]).await?;
    assert!(!listed.to_string().contains("\"tim\""), "{listed}");
    let bob = As {
        token: add(
            &root,
            files.path(),
            "bob",
            "approver",
            &["--approval-role", "dba"],
        )
        .await?,
        fleet: &fleet,
    };
    let carol = As {
        token: add(
            &root,
            files.path(),
            "carol",
            "approver",
            &["--approval-role", "lead"],
        )
        .await?,
        fleet: &fleet,
    };
    let mallory = As {
        token: add(&root, files.path(), "mallory", "operator", &[]).await?,
        fleet: &fleet,
    };
    // A name in use is refused; approval roles need a role that approves.
    let out = root
        .cli(&["operator", "add", "alice", "--role", "viewer"])
        .await?;
    refused(&out, "exists already");
    let out = root
        .cli(&[
            "operator",
            "add",
            "dan",
            "--role",
            "operator",
            "--approval-role",
            "dba",
        ])
        .await?;
    refused(&out, "cannot approve");
    // Only an admin manages operators.
    let out = alice.cli(&["operator", "list"]).await?;
    refused(
        &out,
        "operator alice has role operator; ListOperators needs admin",
    );

    // A malformed token, a viewer submitting, a revoked operator: refused, nothing changed.
    let junk = As {
        token: files.join("junk.token"),
        fleet: &fleet,
    };
    std::fs::write(&junk.token, "hunter2\n")?;
    let staging = plan("staging", "001_staged", "staged", "")?;
    let out = junk
        .cli(&["plan", "submit", &staging.path().to_string_lossy()])
        .await?;
    refused(&out, "malformed");
    assert!(
        !out.stderr.contains("hunter2"),
        "the token is never echoed: {out}"
    );
    // (written with the umask's mode: others on the host can read it, and are told so)
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&junk.token)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            assert!(
                out.stderr.contains(&format!(
                    "can be read by other users of this host (mode {mode:04o}): chmod 600 it"
                )),
                "{out}"
            );
        }
    }
    let out = val
        .cli(&["plan", "submit", &staging.path().to_string_lossy()])
        .await?;
    refused(
        &out,
        "operator val has role viewer; SubmitPlan needs operator",
    );
    let out = root.cli(&["operator", "revoke", "mallory"]).await?;
    assert!(out.success(), "{out}");
    let out = mallory
        .cli(&["plan", "submit", &staging.path().to_string_lossy()])
        .await?;
    refused(&out, "the credential of operator mallory was revoked");
    let out = fleet
        .cli(&["plan", "submit", &staging.path().to_string_lossy()])
        .await?;
    refused(&out, "no credential");
    let plans = val.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(plans.as_array().map(Vec::len), Some(0), "{plans}");
    // `env status` is a viewer's too, and sends the token like every operator command.
    let envs = val.cli(&["env", "status", "--output", "json"]).await?;
    assert!(envs.success(), "{envs}");
    assert_eq!(fleet.journal_total().await?, 0, "nothing applied");

    // Each refusal is in the audit trail: who (when known), what, from where.
    let unauthenticated = audited(&val, "unauthenticated").await?;
    let text = serde_json::to_string(&unauthenticated)?;
    assert!(unauthenticated.len() >= 4, "{text}");
    assert!(
        unauthenticated.iter().all(|e| e["actor"] == "anonymous"
            && e["detail"].as_str().unwrap().contains("from 127.0.0.1:")),
        "{text}"
    );
    for why in [
        "malformed",
        "mallory was revoked",
        "no credential",
        "OperatorService/SubmitPlan",
    ] {
        assert!(text.contains(why), "{why}: {text}");
    }
    let denied = audited(&val, "denied").await?;
    let text = serde_json::to_string(&denied)?;
    assert!(
        denied.iter().any(|e| e["actor"] == "val"
            && e["detail"]
                .as_str()
                .unwrap()
                .contains("SubmitPlan from 127.0.0.1:")),
        "{text}"
    );
    assert!(
        denied
            .iter()
            .any(|e| e["actor"] == "alice"
                && e["detail"].as_str().unwrap().contains("ListOperators")),
        "{text}"
    );
    let revoked = audited(&val, "operator-revoke").await?;
    assert_eq!(revoked[0]["actor"], "root", "{revoked:?}");

    // An operator submits: the identity is what the audit trail records (not $USER), and
    // `--as` naming someone else is refused.
    let out = alice
        .cli(&[
            "plan",
            "submit",
            &staging.path().to_string_lossy(),
            "--as",
            "bob",
        ])
        .await?;
    refused(&out, "authenticated as alice; cannot act as `bob`");
    // A baseline too (it records journal rows on every shard under its actor's name); with
    // no --as it runs as alice.
    let path = staging.path().to_string_lossy().into_owned();
    let out = alice
        .cli(&["fleet", "baseline", &path, "--dry-run", "--as", "bob"])
        .await?;
    refused(&out, "authenticated as alice; cannot act as `bob`");
    let out = alice
        .cli(&["fleet", "baseline", &path, "--dry-run"])
        .await?;
    assert!(out.success(), "{out}");
    let (out, _) = {
        let id = alice.submit(staging.path(), &[]).await?;
        alice.watch(&id).await?
    };
    assert_eq!(out.code(), Some(0), "{out}");
    let submits = audited(&val, "submit").await?;
    assert_eq!(submits.len(), 1, "{submits:?}");
    assert_eq!(submits[0]["actor"], "alice", "{submits:?}");

    // Approvals: the approver's matrix role comes from the credential.
    let production = plan("production", "002_prod", "prod_table", "")?;
    let id = alice.submit(production.path(), &[]).await?;
    let st = alice.status(&id).await?;
    assert_eq!(st["state"], "awaiting_approval", "{st}");
    let out = alice.cli(&["plan", "approve", &id]).await?;
    refused(&out, "ApprovePlan needs approver");
    let out = carol.cli(&["plan", "approve", &id]).await?;
    refused(&out, "accepts dba");
    let out = bob.cli(&["plan", "approve", &id, "--role", "lead"]).await?;
    refused(&out, "cannot approve as `lead`: its approval roles are dba");
    // Each refusal is in the plan's own trail, the role refusal (before the handler reads
    // the request) too: it was audited under no plan.
    let trail = val
        .json(&["audit", "list", "--plan", &id, "--output", "json"])
        .await?;
    for (who, why) in [
        ("alice", "ApprovePlan needs approver"),
        ("carol", "accepts dba"),
        ("bob", "cannot approve as `lead`"),
    ] {
        assert!(
            trail
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == "denied"
                    && e["actor"] == who
                    && e["detail"].as_str().unwrap().contains(why)),
            "{who}: {why}: {trail}"
        );
    }
    let st = val.status(&id).await?;
    assert_eq!(
        st["state"], "awaiting_approval",
        "refusals changed nothing: {st}"
    );
    let out = bob
        .cli(&["plan", "approve", &id, "--reason", "reviewed", "--wait"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let approvals = audited(&val, "approve").await?;
    assert_eq!(approvals.len(), 1, "{approvals:?}");
    assert_eq!(approvals[0]["actor"], "bob", "{approvals:?}");
    assert!(
        approvals[0]["detail"].as_str().unwrap().contains("dba"),
        "{approvals:?}"
    );

    // Lock breaks are an admin's: a plan holding its locks at a manual gate.
    let gated = plan(
        "staging",
        "003_gated",
        "gated",
        "\n[[waves]]\nname = \"canary\"\nselector = \"region=r0\"\ngate = \"manual\"\n\n[[waves]]\nname = \"rest\"\nrest = true\n",
    )?;
    let id = alice.submit(gated.path(), &[]).await?;
    wait_until("the gated plan holds shard_0's lock", WAIT, async || {
        let locks = val.json(&["locks", "list", "--output", "json"]).await?;
        Ok(locks.to_string().contains("shard_0") && locks.to_string().contains(&id))
    })
    .await?;
    let out = alice
        .cli(&["locks", "break", "shard_0", "--reason", "stuck"])
        .await?;
    refused(
        &out,
        "operator alice has role operator; BreakLock needs admin",
    );
    let locks = val.json(&["locks", "list", "--output", "json"]).await?;
    assert!(locks.to_string().contains("shard_0"), "still held: {locks}");
    let out = root
        .cli(&["locks", "break", "shard_0", "--reason", "stuck"])
        .await?;
    assert!(out.success(), "{out}");
    let breaks = audited(&val, "break-lock").await?;
    assert_eq!(breaks.len(), 1, "{breaks:?}");
    assert_eq!(breaks[0]["actor"], "root", "{breaks:?}");
    let out = alice.cli(&["plan", "cancel", &id, "--wait"]).await?;
    assert!(out.code().is_some(), "{out}");

    // Skipping the promotion gate is an admin's override: an operator asking is refused,
    // audited, and no plan is made.
    let plan_count = async || -> anyhow::Result<Option<usize>> {
        let plans = val.json(&["plan", "list", "--output", "json"]).await?;
        Ok(plans.as_array().map(Vec::len))
    };
    let plans_before = plan_count().await?;
    let skipped = plan("production", "004_skipped", "skipped", "")?;
    let p = skipped.path().to_string_lossy().into_owned();
    let out = alice
        .cli(&[
            "plan",
            "submit",
            &p,
            "--skip-promotion-check",
            "--reason",
            "hotfix",
        ])
        .await?;
    refused(
        &out,
        "alice has role operator: --skip-promotion-check needs admin",
    );
    let denied = audited(&val, "denied").await?;
    assert!(
        denied.iter().any(|e| e["actor"] == "alice"
            && e["detail"]
                .as_str()
                .unwrap()
                .contains("--skip-promotion-check needs admin")),
        "{denied:?}"
    );
    assert_eq!(plan_count().await?, plans_before, "no plan made");
    // Replacing a plan's down SQL runs SQL no approval saw: an admin's override too
    // (refused before the plan is even looked up).
    let out = alice
        .cli(&["plan", "rollback", "p-any", "--down-from", &p])
        .await?;
    refused(
        &out,
        "alice has role operator: --down-from (down SQL no approval saw, run on every target) needs admin",
    );

    // The operators as an admin sees them: mallory revoked, the others active.
    let list = root.json(&["operator", "list", "--output", "json"]).await?;
    let mallory_row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "mallory")
        .cloned()
        .unwrap();
    assert_eq!(mallory_row["active"], false, "{list}");
    assert!(
        !list.to_string().contains("flotilla_"),
        "no token in the list: {list}"
    );
    Ok(())
}

/// Under mTLS, a client certificate's common name names the operator (its role from the
/// store) when no token is given; a certificate naming no operator is refused, and so is
/// an agent's certificate whose common name is an operator's; a token, when given, wins
/// over the certificate.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_names_the_operator_under_mtls() -> anyhow::Result<()> {
    use crate::harness::certs::env_refs;
    use flotilla_testkit::tls::CertSpec;

    let files = TestDir::new("auth-mtls")?;
    let fleet = TestFleet::builder(1, 1).tls().start().await?;
    let certs = fleet.tls.as_ref().expect("a TLS fleet");
    // The fleet's CLI certificate says CN=alice: alice is a viewer; root the admin (token).
    let root_token = files.join("root.token");
    for (name, role, token) in [
        ("root", "admin", root_token.clone()),
        ("alice", "viewer", files.join("alice.token")),
    ] {
        stored_operator(&fleet.store, name, role, &token).await?;
    }

    // alice by her certificate alone: she reads, she cannot submit.
    let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(plans.as_array().map(Vec::len), Some(0), "{plans}");
    let dir = plan("staging", "001_by_cert", "by_cert", "")?;
    let out = fleet
        .cli(&["plan", "submit", &dir.path().to_string_lossy()])
        .await?;
    refused(
        &out,
        "operator alice has role viewer; SubmitPlan needs operator",
    );

    // A certificate of the fleet's CA that names no operator: refused.
    let stranger = certs
        .ca
        .issue("stranger", &CertSpec::client("stranger", &[]))?;
    let env = certs.client_env(&stranger);
    let out = crate::harness::run_flotilla(
        &["--coordinator", &fleet.addr, "plan", "list"],
        &env_refs(&env),
    )
    .await?;
    refused(&out, "the credential names no operator");

    // An agent's certificate (a `flotilla-agent:` URI SAN) whose common name is root's
    // names no operator: a shard's host is not the admin who shares the name. The agent is
    // known, and not allowed the operator API: PERMISSION_DENIED (exit 2), audited `denied`.
    let agent_root = certs.ca.issue(
        "agent-root",
        &CertSpec::client("root", &["flotilla-agent:shard_0"]),
    )?;
    let env = certs.client_env(&agent_root);
    let out = crate::harness::run_flotilla(
        &["--coordinator", &fleet.addr, "operator", "list"],
        &env_refs(&env),
    )
    .await?;
    refused(
        &out,
        "the client certificate is an agent's (common name root, shard shard_0): it names no operator, and an agent's certificate may not call the operator API",
    );

    // A token wins over the certificate: alice's connection carrying root's token is root.
    let root = As {
        fleet: &fleet,
        token: root_token,
    };
    let list = root.json(&["operator", "list", "--output", "json"]).await?;
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");

    // alice revoked, then her name given again (to someone else, as an admin): the
    // certificate she held (valid from long ago) is hers, not the new operator's.
    let out = root.cli(&["operator", "revoke", "alice"]).await?;
    assert!(out.success(), "{out}");
    let out = fleet.cli(&["plan", "list"]).await?;
    refused(&out, "the credential of operator alice was revoked");
    let out = root
        .cli(&[
            "operator",
            "add",
            "alice",
            "--role",
            "admin",
            "--token-out",
            &files.join("alice2.token").to_string_lossy(),
        ])
        .await?;
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains("client certificates of alice valid from before now were that operator's and are refused"),
        "{out}"
    );
    let out = fleet.cli(&["operator", "list"]).await?;
    refused(&out, "before the name was given again after its revocation");
    assert!(
        out.stderr
            .contains("it was the revoked operator's; issue the operator a new certificate"),
        "{out}"
    );
    // a certificate issued to the new alice (valid from now on) is hers: an admin's
    let new_alice = certs
        .ca
        .issue("alice-again", &CertSpec::client("alice", &[]).from_now())?;
    let env = certs.client_env(&new_alice);
    let out = crate::harness::run_flotilla(
        &[
            "--coordinator",
            &fleet.addr,
            "operator",
            "list",
            "--output",
            "json",
        ],
        &env_refs(&env),
    )
    .await?;
    assert!(out.success(), "{out}");
    let alice_row = serde_json::from_str::<serde_json::Value>(&out.stdout)?
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "alice")
        .cloned()
        .unwrap();
    assert_eq!(
        (&alice_row["role"], &alice_row["active"]),
        (&serde_json::json!("admin"), &serde_json::json!(true)),
        "{alice_row}"
    );
    assert!(
        alice_row["certificates_from_ms"].as_u64().unwrap() > 0,
        "{alice_row}"
    );
    // her certificate alone acts for her, whatever the shell's $USER (a CI runner's): the
    // CLI leaves its default `--as` out. Before, every write was refused ("cannot act as
    // `ci-runner`"), unless $USER happened to be the certificate's name.
    let mut as_runner = env_refs(&env);
    as_runner.push(("USER", "ci-runner"));
    let out = crate::harness::run_flotilla(
        &[
            "--coordinator",
            &fleet.addr,
            "operator",
            "add",
            "carol",
            "--role",
            "viewer",
            "--token-out",
            &files.join("carol.token").to_string_lossy(),
        ],
        &as_runner,
    )
    .await?;
    assert!(out.success(), "{out}");
    let added = audited(&root, "operator-add").await?;
    assert!(
        added
            .iter()
            .any(|e| e["actor"] == "alice" && e["detail"].as_str().unwrap().contains("carol")),
        "{added:?}"
    );

    let denied = audited(&root, "denied").await?;
    assert!(
        denied
            .iter()
            .any(|e| e["actor"] == "alice"
                && e["detail"].as_str().unwrap().contains("from 127.0.0.1:")),
        "{denied:?}"
    );
    let unauthenticated = audited(&root, "unauthenticated").await?;
    assert!(
        unauthenticated
            .iter()
            .any(|e| e["detail"].as_str().unwrap().contains("names no operator")),
        "{unauthenticated:?}"
    );
    assert!(
        denied.iter().any(|e| e["actor"] == "agent"
            && e["detail"]
                .as_str()
                .unwrap()
                .contains("an agent's (common name root, shard shard_0)")),
        "{denied:?}"
    );
    assert_eq!(fleet.journal_total().await?, 0, "nothing applied");
    Ok(())
}

/// With authentication off (no operator yet) over mTLS, a CLI with a client certificate and
/// no `--as` is recorded under the certificate's name, not its shell's $USER (a CI runner's)
/// nor nobody: the CLI leaves its default out for the certificate to name who acts.
#[tokio::test(flavor = "multi_thread")]
async fn with_authentication_off_a_client_certificate_names_who_acts() -> anyhow::Result<()> {
    use crate::harness::certs::env_refs;

    let fleet = TestFleet::builder(1, 1).tls().start().await?;
    let certs = fleet.tls.as_ref().expect("a TLS fleet");
    let mut env = certs.client_env(&certs.operator);
    env.push(("USER".into(), "ci-runner".into()));
    let dir = MigrationDir::new()?;
    dir.migration(
        "001_by_cert",
        "",
        "CREATE TABLE by_cert (x int);",
        "DROP TABLE by_cert;",
    )?;
    let p = dir.path().to_string_lossy().into_owned();
    let out = crate::harness::run_flotilla(
        &["--coordinator", &fleet.addr, "plan", "submit", &p, "--wait"],
        &env_refs(&env),
    )
    .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let audit = fleet.json(&["audit", "list", "--output", "json"]).await?;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "submit" && e["actor"] == "alice"),
        "{audit}"
    );
    Ok(())
}

/// With authentication off (no operator in the store) over mTLS, an agent's certificate is
/// still an agent's: refused on the operator API (PERMISSION_DENIED, exit 2, nothing
/// changed), a bearer header beside it too, and audited `denied` by `agent`, while an
/// operator's certificate acts. It had the whole API: lock breaks, submits.
#[tokio::test(flavor = "multi_thread")]
async fn with_authentication_off_an_agents_certificate_gets_no_operator_rpc() -> anyhow::Result<()>
{
    use crate::harness::certs::env_refs;

    let fleet = TestFleet::builder(1, 1).tls().start().await?;
    let log = fleet.coordinator.as_ref().unwrap().log();
    assert!(
        log.contains("operator authentication is off: any holder of a client certificate from the --tls-ca CA"),
        "{log}"
    );
    let certs = fleet.tls.as_ref().expect("a TLS fleet");
    let agent_env = certs.client_env(&certs.agent(&fleet.shards[0])?);
    let as_agent = async |args: &[&str]| {
        let mut all = vec!["--coordinator", fleet.addr.as_str()];
        all.extend_from_slice(args);
        crate::harness::run_flotilla(&all, &env_refs(&agent_env)).await
    };
    let dir = plan("staging", "001_by_agent", "by_agent", "")?;
    let path = dir.path().to_string_lossy().into_owned();
    for args in [
        &["locks", "list"][..],
        &["plan", "submit", &path],
        &["locks", "break", "shard_0", "--reason", "agent"],
    ] {
        let out = as_agent(args).await?;
        refused(&out, "an agent's certificate may not call the operator API");
        assert!(out.stderr.contains("shard shard_0"), "{args:?}: {out}");
    }
    // a token beside it names nobody while no operator exists: refused the same
    let files = TestDir::new("agent-token")?;
    let token = files.join("token");
    std::fs::write(&token, "flotilla_0000\n")?;
    let token_arg = token.to_string_lossy().into_owned();
    let out = as_agent(&["--token-file", &token_arg, "locks", "list"]).await?;
    refused(&out, "an agent's certificate may not call the operator API");

    // the operator's certificate (alice) reads the trail: the refusals are there, by the
    // agent, with the RPC and where from; nothing was submitted
    let audit = fleet.json(&["audit", "list", "--output", "json"]).await?;
    let denied: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "denied" && e["actor"] == "agent")
        .collect();
    for rpc in ["ListLocks", "SubmitPlan", "BreakLock"] {
        assert!(
            denied.iter().any(|e| {
                let d = e["detail"].as_str().unwrap();
                d.contains(&format!("OperatorService/{rpc} from 127.0.0.1:"))
                    && d.contains("shard shard_0")
            }),
            "{rpc}: {audit}"
        );
    }
    let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(plans.as_array().map(Vec::len), Some(0), "{plans}");
    Ok(())
}

/// `--auth required`: with no operator yet every operator request is refused (no warning
/// that authentication is off), and the first admin made in the store gets in.
#[tokio::test(flavor = "multi_thread")]
async fn auth_required_refuses_everyone_until_the_first_admin_is_in_the_store() -> anyhow::Result<()>
{
    use crate::harness::{FlotillaProcess, free_port, run_flotilla};

    let files = TestDir::new("auth-required")?;
    let store = files.join("flotilla.db").to_string_lossy().into_owned();
    let listen = format!("127.0.0.1:{}", free_port());
    let addr = format!("http://{listen}");
    let coordinator = FlotillaProcess::spawn(
        &[
            "coordinator",
            "--listen",
            &listen,
            "--store",
            &store,
            "--auth",
            "required",
        ],
        &[],
    )?;
    coordinator
        .wait_for_log("coordinator listening", WAIT)
        .await?;
    let log = coordinator.log();
    assert!(log.contains("operators authenticate"), "{log}");
    assert!(!log.contains("authentication is off"), "{log}");

    let out = run_flotilla(&["--coordinator", &addr, "plan", "list"], &[]).await?;
    refused(&out, "unauthenticated: no credential");
    let out = run_flotilla(
        &[
            "--coordinator",
            &addr,
            "operator",
            "add",
            "eve",
            "--role",
            "admin",
        ],
        &[],
    )
    .await?;
    refused(&out, "no credential");

    let token = files.join("root.token");
    stored_operator(&store, "root", "admin", &token).await?;
    let token = token.to_string_lossy().into_owned();
    let out = run_flotilla(
        &[
            "--coordinator",
            &addr,
            "--token-file",
            &token,
            "plan",
            "list",
        ],
        &[],
    )
    .await?;
    assert!(out.success(), "{out}");
    // The token file may also come from the environment.
    let out = run_flotilla(
        &[
            "--coordinator",
            &addr,
            "operator",
            "list",
            "--output",
            "json",
        ],
        &[("FLOTILLA_TOKEN_FILE", &token)],
    )
    .await?;
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("\"root\""), "{out}");
    Ok(())
}

/// `operator add --store` at a path where no store is (a typo of the coordinator's) is
/// refused, making nothing; `--create` makes it (the first admin before the coordinator's
/// first start). A `--store` of a scheme that is no store is named, exit 2.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_path_with_no_store_is_refused_unless_asked_to_create() -> anyhow::Result<()> {
    let dir = TestDir::new("auth-store-typo")?;
    let typo = dir.join("flotila-typo.db");
    let token = dir.join("root.token");
    let add = |create: bool| {
        let mut args = vec![
            "operator".to_string(),
            "add".into(),
            "root".into(),
            "--role".into(),
            "admin".into(),
            "--store".into(),
            typo.to_string_lossy().into_owned(),
            "--token-out".into(),
            token.to_string_lossy().into_owned(),
        ];
        if create {
            args.push("--create".into());
        }
        args
    };
    let args = add(false);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::harness::run_flotilla(&refs, &[]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("no control store there"), "{out}");
    assert!(!typo.exists() && !token.exists(), "nothing made");
    let args = add(true);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::harness::run_flotilla(&refs, &[]).await?;
    assert!(out.success(), "{out}");
    assert!(typo.exists() && token.exists());

    let out =
        crate::harness::run_flotilla(&["operator", "list", "--store", "mysql://x/flotilla"], &[])
            .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("`mysql://` is not a control store"),
        "{out}"
    );
    Ok(())
}

/// An approval is its approver's while they hold their name: one revoked after approving
/// no longer counts (it counted, and with one more approval a production plan ran on a
/// revoked, perhaps compromised, account's say).
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_approvers_approval_no_longer_counts() -> anyhow::Result<()> {
    let files = TestDir::new("auth-revoked-approver")?;
    let matrix = files.join("approvals.toml");
    std::fs::write(
        &matrix,
        "[[rule]]\nenvironment = \"production\"\nrisk = \"*\"\napprovals = 2\nroles = [\"dba\", \"lead\"]\n",
    )?;
    let matrix = matrix.to_string_lossy().into_owned();
    let fleet = TestFleet::builder(1, 1)
        .coordinator_args(&["--approvals", &matrix])
        .start()
        .await?;
    let root = first_admin(&fleet, files.path()).await?;
    let alice = As {
        token: add(&root, files.path(), "alice", "operator", &[]).await?,
        fleet: &fleet,
    };
    let mut approvers = Vec::new();
    for (name, role) in [("bob", "dba"), ("carol", "lead"), ("dave", "dba")] {
        approvers.push(As {
            token: add(
                &root,
                files.path(),
                name,
                "approver",
                &["--approval-role", role],
            )
            .await?,
            fleet: &fleet,
        });
    }
    let production = plan("production", "002_prod", "prod_table", "")?;
    let id = alice.submit(production.path(), &[]).await?;
    let out = approvers[0].cli(&["plan", "approve", &id]).await?;
    assert!(out.success(), "{out}");
    let out = root.cli(&["operator", "revoke", "bob"]).await?;
    assert!(out.success(), "{out}");
    // carol's approval would have been the second: bob's is gone, one is still missing
    let out = approvers[1].cli(&["plan", "approve", &id]).await?;
    assert!(out.success(), "{out}");
    let st = alice.status(&id).await?;
    assert_eq!(st["state"], "awaiting_approval", "{st}");
    let out = approvers[2]
        .cli(&["plan", "approve", &id, "--wait"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(alice.status(&id).await?["state"], "completed");
    Ok(())
}

/// PostgreSQL's DETAIL of a failure (the failing row's values) is shown to operators and
/// withheld from viewers (a viewer read `Failing row contains (...)` of a production table).
#[tokio::test(flavor = "multi_thread")]
async fn a_failures_detail_is_withheld_from_viewers() -> anyhow::Result<()> {
    let files = TestDir::new("auth-detail")?;
    let fleet = TestFleet::builder(1, 1).start().await?;
    let root = first_admin(&fleet, files.path()).await?;
    let alice = As {
        token: add(&root, files.path(), "alice", "operator", &[]).await?,
        fleet: &fleet,
    };
    let val = As {
        token: add(&root, files.path(), "val", "viewer", &[]).await?,
        fleet: &fleet,
    };
    let d = MigrationDir::new()?;
    d.migration(
        "001_secret_row",
        "",
        "CREATE TABLE cards (n text NOT NULL, holder text); \
         INSERT INTO cards VALUES (NULL, 'Canary Holder 4111')",
        "DROP TABLE IF EXISTS cards",
    )?;
    let id = alice.submit(d.path(), &["--policy", "stop"]).await?;
    let (_, st) = alice.watch(&id).await?;
    assert_eq!(st["state"], "failed", "{st}");
    assert!(
        st["failures"].to_string().contains("Canary Holder 4111"),
        "an operator sees the detail: {st}"
    );
    let seen = val.status(&id).await?;
    let failures = seen["failures"].to_string();
    assert!(!failures.contains("Canary Holder 4111"), "{seen}");
    assert!(failures.contains("withheld from viewers"), "{seen}");
    // a value PostgreSQL quotes in the message itself is withheld too (a viewer read
    // `invalid input syntax for type integer: "urgent"` of a production row)
    let d = MigrationDir::new()?;
    d.migration(
        "002_secret_value",
        "",
        "SELECT 'Canary Value 5500'::integer",
        "SELECT 1",
    )?;
    let id = alice.submit(d.path(), &["--policy", "stop"]).await?;
    let (_, st) = alice.watch(&id).await?;
    assert!(
        st.to_string().contains("Canary Value 5500"),
        "an operator sees it: {st}"
    );
    let seen = val.status(&id).await?;
    assert!(!seen.to_string().contains("Canary Value 5500"), "{seen}");
    assert!(
        seen["failures"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("invalid input syntax for type integer: \"(withheld")),
        "{seen}"
    );
    Ok(())
}
