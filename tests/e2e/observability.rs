//! Issue 11: the Grafana dashboard and the alert rules point only at metrics a running
//! coordinator or agent serves, and what they serve passes `promtool check metrics`.
//!
//! One fleet (etcd, a coordinator and an agent, each with `--metrics`) runs a schema
//! plan, a data migration in a production plan and an atomic (two-phase) plan; then a
//! real Prometheus loads `deploy/prometheus/alerts.yml`, scrapes both and evaluates the
//! rules, and answers every expression of the dashboard. Then the rules against a real
//! fleet: which alerts fire, and when.
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::fleet::{Cli, MigrationDir, WAIT, coord_dbmate_dir};
use crate::ha::HaFleet;
use crate::harness::{ManagedProcess, TestDir, free_port, http, wait_until};
use crate::shards::{hold, logged_blocking_migration, release};

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn promtool() -> String {
    std::env::var("FLOTILLA_PROMTOOL_BIN").unwrap_or_else(|_| "promtool".into())
}

fn prometheus() -> String {
    std::env::var("FLOTILLA_PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into())
}

/// The metric names a PromQL expression reads: identifiers with Flotilla's prefix,
/// outside string literals (label values such as `"flotilla-agent"` are not names).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut bare = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                bare.push(' ');
            }
            None if matches!(c, '"' | '\'' | '`') => {
                quote = Some(c);
                bare.push(' ');
            }
            None => bare.push(c),
        }
    }
    bare.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("flotilla_"))
        .map(str::to_string)
        .collect()
}

/// Every PromQL expression of the dashboard: panel targets and template variables.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        ("definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The metric names a Prometheus text page serves (a histogram's samples by their
/// `_bucket`/`_sum`/`_count` names, and by its own name from its TYPE line).
fn served_names(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Pipes a scrape through `promtool check metrics`: Ok only when it finds nothing.
async fn promtool_check_metrics(what: &str, body: &str) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian's prometheus package; scripts/test.sh installs it, or set FLOTILLA_PROMTOOL_BIN)")?;
    let mut stdin = child.stdin.take().context("promtool's stdin")?;
    stdin.write_all(body.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!(
            "promtool check metrics on the {what}'s /metrics ({}): {said}\n{body}",
            out.status
        );
    }
    Ok(())
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus scraping the coordinator and the agent every second and
/// evaluating Flotilla's alert rules.
struct Prometheus {
    _process: ManagedProcess,
    addr: SocketAddr,
    _dir: TestDir,
}

impl Prometheus {
    async fn start(coordinator: SocketAddr, agent: SocketAddr) -> anyhow::Result<Prometheus> {
        let dir = TestDir::new("prometheus-rules")?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n\
                 \x20 - job_name: flotilla-coordinator\n    static_configs:\n      - targets: ['{coordinator}']\n\
                 \x20 - job_name: flotilla-agent\n    static_configs:\n      - targets: ['{agent}']\n",
                repo_path("deploy/prometheus/alerts.yml").display()
            ),
        )?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut cmd = Command::new(prometheus());
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"));
        let process = ManagedProcess::spawn(cmd, "prometheus", &dir.join("prometheus.log"))?;
        Ok(Prometheus {
            _process: process,
            addr,
            _dir: dir,
        })
    }

    async fn api(&self, path: &str) -> anyhow::Result<Value> {
        let r = http::get(self.addr, path).await?;
        let v: Value = serde_json::from_str(&r.body)
            .with_context(|| format!("{path}: HTTP {}: {}", r.status, r.body))?;
        Ok(v)
    }

    async fn query(&self, expr: &str) -> anyhow::Result<Value> {
        self.api(&format!("/api/v1/query?query={}", encode(expr)))
            .await
    }
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let r = http::get(addr, "/metrics").await?;
    if r.status != 200 {
        bail!("GET {addr}/metrics: HTTP {}: {}", r.status, r.body);
    }
    Ok(r.body)
}

/// A schema change then a batched data change (2 rows a batch), in a production plan.
fn production_data_plan() -> anyhow::Result<MigrationDir> {
    let d = MigrationDir::new()?;
    std::fs::write(
        d.path().join("plan.toml"),
        "name = \"observed backfill\"\nenvironment = \"production\"\n",
    )?;
    d.migration(
        "20250301000000_add_observed",
        "",
        "ALTER TABLE work_orders ADD COLUMN observed int NOT NULL DEFAULT 0",
        "ALTER TABLE work_orders DROP COLUMN observed",
    )?;
    d.migration(
        "20250301000001_backfill_observed",
        "kind = \"data\"\ndepends_on = [\"20250301000000_add_observed\"]\n\
         [data]\ntable = \"work_orders\"\nkey = \"id\"\nbatch_size = 2\n\
         batch = \"UPDATE work_orders SET observed = 1 WHERE id > $1 AND id <= $2\"\n",
        "",
        "UPDATE work_orders SET observed = 0",
    )?;
    Ok(d)
}

fn atomic_plan() -> anyhow::Result<MigrationDir> {
    let d = MigrationDir::new()?;
    d.migration(
        "20250302000000_observed_atomic",
        "",
        "CREATE TABLE observed_atomic (id int PRIMARY KEY)",
        "DROP TABLE observed_atomic",
    )?;
    Ok(d)
}

async fn submit_wait(fleet: &HaFleet, dir: &Path, extra: &[&str]) -> anyhow::Result<Value> {
    let p = dir.to_string_lossy().into_owned();
    let mut args = vec!["plan", "submit", p.as_str(), "--wait", "--output", "json"];
    args.extend_from_slice(extra);
    let out = fleet.cli(&args).await?;
    assert_eq!(out.code(), Some(0), "{args:?}: {out}");
    let status = out.last_json()?;
    assert_eq!(status["state"], "completed", "{status}");
    Ok(status)
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_and_alert_rules_use_only_served_metrics() -> anyhow::Result<()> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo_path(
        "deploy/grafana/dashboards/flotilla.json",
    ))?)?;
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() > 20, "the dashboard's expressions: {exprs:?}");

    let coordinator: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let agent: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let (c, a) = (coordinator.to_string(), agent.to_string());
    let mut fleet = HaFleet::builder(1, 1, 2)
        .coordinator_args(&["--metrics", &c])
        .agent_args(&["--metrics", &a])
        .start()
        .await?;

    // Steps, a data change (in production), and a two-phase commit.
    submit_wait(&fleet, &coord_dbmate_dir(), &[]).await?;
    let data = production_data_plan()?;
    let status = submit_wait(&fleet, data.path(), &[]).await?;
    assert_eq!(status["environment"], "production", "{status}");
    let atomic = atomic_plan()?;
    let status = submit_wait(&fleet, atomic.path(), &["--atomic"]).await?;
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("committed atomically")),
        "{status}"
    );

    // Prometheus loads the rules (a rule file it cannot parse fails it at start) and
    // evaluates them against what the two serve.
    let prom = Prometheus::start(coordinator, agent).await?;
    let rules: Vec<Value> = wait_for_rules(&prom).await?;
    let names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    for alert in [
        "FlotillaPlanFailed",
        "FlotillaPlanOverdue",
        "FlotillaProductionPlanRunning",
        "FlotillaAgentDisconnected",
        "FlotillaNoLeader",
        "FlotillaControlStoreUnreachable",
        "FlotillaControlStoreWriteLost",
        "FlotillaPreparedTransactionStale",
        "FlotillaDataChangeThrottled",
    ] {
        assert!(names.contains(&alert), "{alert} not among {names:?}");
    }
    let rule_exprs: Vec<String> = rules
        .iter()
        .filter_map(|r| r["query"].as_str().map(str::to_string))
        .collect();

    let mut referenced: BTreeSet<String> = BTreeSet::new();
    for e in exprs.iter().chain(&rule_exprs) {
        referenced.extend(metric_names(e));
    }
    assert!(referenced.len() > 25, "{referenced:?}");
    // Served only under TLS, which this fleet does not speak: tls.rs checks it is served
    // (`certificates_reload_on_sighup_and_an_expiring_one_is_said`).
    assert!(referenced.remove("flotilla_tls_certificate_expiry_timestamp_seconds"));

    // The data gauges follow the engine at its next tick, the prepared transactions'
    // age at the agent's next census: wait for every name rather than for a time.
    let missing = async || -> anyhow::Result<Vec<String>> {
        let mut served = served_names(&scrape(coordinator).await?);
        served.extend(served_names(&scrape(agent).await?));
        Ok(referenced.difference(&served).cloned().collect())
    };
    if wait_until(
        "every metric the dashboard and the rules read is served",
        WAIT,
        async || Ok(missing().await?.is_empty()),
    )
    .await
    .is_err()
    {
        bail!(
            "referenced by the dashboard or alerts.yml but served by neither the coordinator \
             nor the agent: {:?}",
            missing().await?
        );
    }

    // What each serves is clean for promtool, and the agent's series name their shard.
    let coordinator_body = scrape(coordinator).await?;
    let agent_body = scrape(agent).await?;
    promtool_check_metrics("coordinator", &coordinator_body).await?;
    promtool_check_metrics("agent", &agent_body).await?;
    assert!(
        agent_body.contains("flotilla_agent_steps_total{shard=\"shard_0\",outcome=\"applied\"}")
            || agent_body
                .contains("flotilla_agent_steps_total{outcome=\"applied\",shard=\"shard_0\"}"),
        "{agent_body}"
    );
    assert!(
        coordinator_body.contains("flotilla_plans{state=\"running\",environment=\"production\"} 0"),
        "the production plan ended: {coordinator_body}"
    );
    // No plan id as a label value anywhere.
    assert!(!coordinator_body.contains("plan=\""), "{coordinator_body}");

    // Every dashboard expression is valid PromQL to a real Prometheus, with Grafana's
    // variables as Grafana would substitute them.
    for e in &exprs {
        let q = e.replace("$__rate_interval", "1m").replace("$shard", ".*");
        let q = match q.strip_prefix("label_values(") {
            // a variable's query lists label values: the selector inside must parse
            Some(rest) => rest
                .rsplit_once(',')
                .map(|(sel, _)| sel.to_string())
                .unwrap_or(q.clone()),
            None => q,
        };
        let v = prom.query(&q).await?;
        assert_eq!(v["status"], "success", "{q}: {v}");
    }

    // The rules evaluated without error, and the leader's epoch reached Prometheus.
    wait_until("the rules evaluated healthy", WAIT, async || {
        let rules = wait_for_rules(&prom).await?;
        Ok(rules.iter().all(|r| r["health"] == "ok"))
    })
    .await?;
    wait_until("Prometheus has the leader's epoch", WAIT, async || {
        let v = prom.query("max(flotilla_leader_epoch) > 0").await?;
        Ok(v["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty()))
    })
    .await?;

    // The agent's stream lost (its coordinator restarted) and up again: one reconnection,
    // however many dials it took meanwhile (each round of them counted before).
    let reconnects = |body: &str| {
        body.lines()
            .find(|l| l.starts_with("flotilla_agent_reconnects_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(reconnects(&scrape(agent).await?), Some(0.0));
    fleet.restart_coordinator_with(0, &[]).await?;
    fleet.wait_connected(1).await?;
    wait_until("the agent attached again", WAIT, async || {
        let body = scrape(agent).await?;
        Ok(sample(
            &body,
            "flotilla_agent_coordinator_connected{shard=\"shard_0\"}",
        ) == Some(1.0))
    })
    .await?;
    assert_eq!(reconnects(&scrape(agent).await?), Some(1.0));
    Ok(())
}

/// The rules Prometheus loaded, once each has been evaluated at least once.
async fn wait_for_rules(prom: &Prometheus) -> anyhow::Result<Vec<Value>> {
    let mut found = Vec::new();
    wait_until("Prometheus evaluated Flotilla's rules", WAIT, async || {
        let v = prom.api("/api/v1/rules").await?;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = !rules.is_empty()
            && rules.iter().all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            });
        if evaluated {
            found = rules;
        }
        Ok(evaluated)
    })
    .await?;
    Ok(found)
}

#[test]
fn metric_names_skip_label_values_and_functions() {
    let names = metric_names(
        r#"sum by (shard) (rate(flotilla_steps_finished_total{job="flotilla_x", outcome=~"a|b"}[$__rate_interval])) / on (job) group_left () flotilla_leader"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["flotilla_leader", "flotilla_steps_finished_total"]
    );
}

/// The labels of Flotilla's alerts firing in Prometheus now, by alert name.
async fn firing(prom: &Prometheus, alert: &str) -> anyhow::Result<Vec<Value>> {
    let v = prom.api("/api/v1/alerts").await?;
    Ok(v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] == alert && a["state"] == "firing")
        .map(|a| a["labels"].clone())
        .collect())
}

/// The value of the one series `name{labels}` (exactly as served) in a scrape.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The rules against a real fleet: a production plan in motion fires the informational
/// alert (and it clears when the plan ends), a throttled data change shows as throttled on
/// its shard, a prepared transaction left on a shard shows with its age, and an agent gone
/// past the grace fires for its shard.
#[tokio::test(flavor = "multi_thread")]
async fn alerts_fire_on_a_real_fleet() -> anyhow::Result<()> {
    let coordinator: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let agent: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let (c, a) = (coordinator.to_string(), agent.to_string());
    let mut fleet = HaFleet::builder(1, 1, 2)
        .coordinator_args(&["--metrics", &c, "--agent-grace", "2s"])
        .agent_args(&["--metrics", &a])
        .start()
        .await?;
    let prom = Prometheus::start(coordinator, agent).await?;

    // Probes on the metrics ports: /healthz while the process answers, /readyz while it
    // can work (the leader with its store; an agent attached to it), 404 off them (every
    // path answered the metrics page, so a probe of any path passed).
    for addr in [coordinator, agent] {
        wait_until("ready", WAIT, async || {
            Ok(http::get(addr, "/readyz").await?.status == 200)
        })
        .await?;
        let r = http::get(addr, "/healthz").await?;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{addr}");
        let r = http::get(addr, "/health/live").await?;
        assert_eq!(r.status, 404, "{addr}: {}", r.body);
        assert!(r.body.contains("/readyz"), "{addr}: {}", r.body);
    }
    // The agent without its coordinator is alive and not ready, and says why.
    if let Some(mut c) = fleet.coordinators[0].take() {
        c.kill()?;
        fleet.retired.push(c);
    }
    wait_until("the agent is not ready", WAIT, async || {
        Ok(http::get(agent, "/readyz").await?.status == 503)
    })
    .await?;
    let r = http::get(agent, "/readyz").await?;
    assert_eq!(
        r.body, "not ready: not attached to the leading coordinator\n",
        "{r:?}"
    );
    assert_eq!(http::get(agent, "/healthz").await?.status, 200);
    fleet.restart_coordinator_with(0, &[]).await?;
    wait_until("the agent is ready again", WAIT, async || {
        Ok(http::get(agent, "/readyz").await?.status == 200)
    })
    .await?;
    // Nor while its database does not answer it (it said ready, taking no runs).
    crate::shards::cut_off(&fleet.pg, "shard_0", true).await?;
    wait_until(
        "the agent is not ready without its database",
        WAIT,
        async || Ok(http::get(agent, "/readyz").await?.status == 503),
    )
    .await?;
    let r = http::get(agent, "/readyz").await?;
    assert!(
        r.body.contains("it does not hold its shard's agent lock"),
        "{r:?}"
    );
    crate::shards::cut_off(&fleet.pg, "shard_0", false).await?;
    wait_until("the agent is ready with its database", WAIT, async || {
        Ok(http::get(agent, "/readyz").await?.status == 200)
    })
    .await?;

    // A production plan held in motion: tenant_0000 waits on an advisory lock we hold.
    let lock = hold(&fleet.pg, 0, 4711).await?;
    let d = MigrationDir::new()?;
    std::fs::write(
        d.path().join("plan.toml"),
        "name = \"held\"\nenvironment = \"production\"\n",
    )?;
    logged_blocking_migration(&d, "tenant_0000", 4711)?;
    let id = fleet.submit(d.path(), &[]).await?;
    wait_until("the production plan's alert fires", WAIT, async || {
        Ok(!firing(&prom, "FlotillaProductionPlanRunning")
            .await?
            .is_empty())
    })
    .await?;
    let body = scrape(coordinator).await?;
    assert_eq!(
        sample(
            &body,
            "flotilla_plans{state=\"running\",environment=\"production\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "flotilla_shard_locks_held"),
        Some(1.0),
        "{body}"
    );
    release(lock, 4711).await?;
    let (out, status) = fleet.watch(&id).await?;
    assert_eq!(status["state"], "completed", "{out}");
    wait_until("the production plan's alert clears", WAIT, async || {
        Ok(firing(&prom, "FlotillaProductionPlanRunning")
            .await?
            .is_empty())
    })
    .await?;

    // An operator's rollback of it ends rolled_back by the operator; a plan's own failure
    // by the plan, and only that fires FlotillaPlanFailed (it fired for the operator's
    // rollback too, and twice for a failed plan an operator rolled back).
    let out = fleet
        .cli(&["plan", "rollback", &id, "--wait", "--reason", "not today"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let d = MigrationDir::new()?;
    d.migration(
        "20250302000000_fails",
        "",
        "ALTER TABLE no_such_table ADD COLUMN x int",
        "ALTER TABLE no_such_table DROP COLUMN x",
    )?;
    let failed = fleet.submit(d.path(), &["--policy", "stop"]).await?;
    let (out, status) = fleet.watch(&failed).await?;
    assert_eq!(status["state"], "failed", "{out}");
    let body = scrape(coordinator).await?;
    for (series, n) in [
        ("{state=\"rolled_back\",by=\"operator\"}", 1.0),
        ("{state=\"rolled_back\",by=\"plan\"}", 0.0),
        ("{state=\"failed\",by=\"plan\"}", 1.0),
    ] {
        assert_eq!(
            sample(&body, &format!("flotilla_plans_finished_total{series}")),
            Some(n),
            "{series}: {body}"
        );
    }
    wait_until("the failure's alert fires", WAIT, async || {
        Ok(!firing(&prom, "FlotillaPlanFailed").await?.is_empty())
    })
    .await?;
    let states: Vec<Value> = firing(&prom, "FlotillaPlanFailed")
        .await?
        .iter()
        .map(|l| l["state"].clone())
        .collect();
    assert_eq!(states, ["failed"], "{states:?}");

    // A data change held back by a health signal above its limit: both sides say it waits,
    // throttled, on shard_0; once the signal is down it ends and the gauges go back to 0.
    fleet
        .pg
        .psql(
            "shard_0",
            "CREATE TABLE public.load (v int); INSERT INTO public.load VALUES (9)",
        )
        .await?;
    let d = MigrationDir::new()?;
    d.migration(
        "20250303000000_throttled_backfill",
        "kind = \"data\"\n[data]\ntable = \"work_orders\"\nkey = \"id\"\nbatch_size = 2\n\
         batch = \"UPDATE work_orders SET priority = 'observed' WHERE id > $1 AND id <= $2\"\n\
         [[data.throttle.check]]\nname = \"queue depth\"\nsql = \"SELECT v FROM public.load\"\nmax = 5\n",
        "",
        "UPDATE work_orders SET priority = 'normal'",
    )?;
    let id = fleet.submit(d.path(), &[]).await?;
    wait_until(
        "the data change shows throttled on both sides",
        WAIT,
        async || {
            let c = scrape(coordinator).await?;
            let a = scrape(agent).await?;
            Ok(sample(
                &c,
                "flotilla_data_targets_waiting{shard=\"shard_0\",why=\"throttled\"}",
            )
            .is_some_and(|n| n >= 1.0)
                && sample(
                    &a,
                    "flotilla_agent_data_waiting{shard=\"shard_0\",why=\"throttled\"}",
                )
                .is_some_and(|n| n >= 1.0))
        },
    )
    .await?;
    fleet
        .pg
        .psql("shard_0", "UPDATE public.load SET v = 0")
        .await?;
    let (out, status) = fleet.watch(&id).await?;
    assert_eq!(status["state"], "completed", "{out}");
    wait_until("the data gauges back at 0", WAIT, async || {
        let c = scrape(coordinator).await?;
        Ok(sample(
            &c,
            "flotilla_data_targets_waiting{shard=\"shard_0\",why=\"throttled\"}",
        ) == Some(0.0)
            && sample(&c, "flotilla_data_rows_per_second{shard=\"shard_0\"}") == Some(0.0))
    })
    .await?;

    // A prepared transaction of Flotilla's name left on the shard: counted, and aged
    // from pg_prepared_xacts (the agent reads it every few seconds).
    let gid = "flotilla:00000000-0000-4000-8000-000000000011:1:1:shard_0";
    fleet
        .pg
        .psql(
            "shard_0",
            &format!("BEGIN; CREATE TABLE left_prepared (x int); PREPARE TRANSACTION '{gid}';"),
        )
        .await?;
    wait_until(
        "the agent sees the prepared transaction and its age",
        WAIT,
        async || {
            let body = scrape(agent).await?;
            Ok(sample(
                &body,
                "flotilla_agent_prepared_transactions{shard=\"shard_0\"}",
            ) == Some(1.0)
                && sample(
                    &body,
                    "flotilla_agent_prepared_oldest_age_seconds{shard=\"shard_0\"}",
                )
                .is_some_and(|age| age >= 1.0))
        },
    )
    .await?;
    fleet
        .pg
        .psql("shard_0", &format!("ROLLBACK PREPARED '{gid}'"))
        .await?;
    wait_until("the agent sees it gone", WAIT, async || {
        let body = scrape(agent).await?;
        Ok(sample(
            &body,
            "flotilla_agent_prepared_transactions{shard=\"shard_0\"}",
        ) == Some(0.0)
            && sample(
                &body,
                "flotilla_agent_prepared_oldest_age_seconds{shard=\"shard_0\"}",
            ) == Some(0.0))
    })
    .await?;

    // The agent dies: past the 2s grace, the leader's alert names its shard.
    assert!(firing(&prom, "FlotillaAgentDisconnected").await?.is_empty());
    fleet.agents[0].kill()?;
    wait_until("the agent's disconnection fires", WAIT, async || {
        Ok(firing(&prom, "FlotillaAgentDisconnected")
            .await?
            .iter()
            .any(|l| l["shard"] == "shard_0"))
    })
    .await?;
    let body = scrape(coordinator).await?;
    assert_eq!(
        sample(&body, "flotilla_shard_agent_connected{shard=\"shard_0\"}"),
        Some(0.0),
        "{body}"
    );
    assert!(firing(&prom, "FlotillaNoLeader").await?.is_empty());

    // A coordinator restarted once the agent's liveness key is gone knows the shard from
    // the control store: its agent away since it was last seen. Before, the shard had no
    // series at all under the new coordinator, and the alert resolved with the agent still
    // dead.
    wait_until("the agent's liveness key expired", WAIT, async || {
        Ok(!crate::faults::etcd_has(&fleet, "/flotilla/agents/shard_0").await?)
    })
    .await?;
    fleet.restart_coordinator_with(0, &[]).await?;
    wait_until(
        "the new coordinator shows the agent away",
        WAIT,
        async || {
            let body = scrape(coordinator).await?;
            let away = sample(
                &body,
                "flotilla_shard_agent_disconnected_seconds{shard=\"shard_0\"}",
            );
            Ok(
                sample(&body, "flotilla_shard_agent_connected{shard=\"shard_0\"}") == Some(0.0)
                    && away.is_some_and(|s| s >= 2.0),
            )
        },
    )
    .await?;
    // and its step counters from 0, so that the next failure there shows in `increase()`
    let body = scrape(coordinator).await?;
    assert!(
        body.lines()
            .any(|l| l.starts_with("flotilla_steps_finished_total{")
                && l.contains("shard=\"shard_0\"")
                && l.contains("outcome=\"failed\"")
                && l.ends_with(" 0")),
        "{body}"
    );
    wait_until("the disconnection fires again", WAIT, async || {
        Ok(firing(&prom, "FlotillaAgentDisconnected")
            .await?
            .iter()
            .any(|l| l["shard"] == "shard_0"))
    })
    .await?;
    Ok(())
}

/// The dashboard as Grafana lays it out: unique panel ids, panels within the 24-column
/// grid and not on top of each other, every query with a refId through the `datasource`
/// variable, and only variables the dashboard defines (or Grafana's own).
#[test]
fn dashboard_is_well_formed() -> anyhow::Result<()> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(repo_path(
        "deploy/grafana/dashboards/flotilla.json",
    ))?)?;
    assert_eq!(d["uid"], "flotilla");
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "{}",
        d["schemaVersion"]
    );
    let vars: BTreeSet<String> = d["templating"]["list"]
        .as_array()
        .context("templating")?
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    assert!(
        vars.contains("datasource") && vars.contains("shard"),
        "{vars:?}"
    );

    let panels = d["panels"].as_array().context("panels")?;
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, u64, u64, u64, u64)> = Vec::new();
    for p in panels {
        let title = p["title"].as_str().context("a panel without a title")?;
        assert!(
            ids.insert(p["id"].as_u64().context("panel id")?),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().context("x")?,
            g["y"].as_u64().context("y")?,
            g["w"].as_u64().context("w")?,
            g["h"].as_u64().context("h")?,
        );
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: {g}");
        for (other, ox, oy, ow, oh) in &boxes {
            let apart = x + w <= *ox || ox + ow <= x || y + h <= *oy || oy + oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        boxes.push((title.to_string(), x, y, w, h));
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().context("targets")?;
        assert!(!targets.is_empty(), "{title} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().context("refId")?),
                "{title}"
            );
            let expr = t["expr"].as_str().context("expr")?;
            assert!(!metric_names(expr).is_empty(), "{title}: {expr}");
            for var in expr.split('$').skip(1) {
                let name: String = var
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || vars.contains(&name),
                    "{title}: unknown variable ${name} in {expr}"
                );
            }
        }
    }
    Ok(())
}
