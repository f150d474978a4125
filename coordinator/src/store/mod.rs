//! The control store: plans, steps, attempts, agents and the audit trail, through
//! sqlx's `Any` driver so the same SQL runs on the embedded SQLite file and on
//! PostgreSQL (`--store postgres://...`). Its own schema is migrated at start.
//!
//! The store is the coordinator's memory, not the truth about shards: after any
//! doubt the agents' journals win (DESIGN invariant 1).
//!
//! - [`schema`]: the tables; [`rows`]: typed rows and the writes the engine asks for;
//! - [`writer`]: the batched writer task; [`operators`]: operator identities (hashed
//!   tokens); [`history`]: recorded step durations (the dry run's estimates); this module:
//!   opening and the queries.
mod history;
mod operators;
mod rows;
mod schema;
mod writer;

use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_core::pb;
use flotilla_core::secrets::SecretUrl;
use flotilla_core::state::PlanState;
use prost::Message;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

pub use history::StepDuration;
pub use operators::OperatorRow;
pub use rows::{
    AgentRow, Audit, PlanRow, StepRow, StepSummary, StepUpdate, StoreOp, WaveRow, WaveTarget,
};
use schema::{SCHEMA, SCHEMA_VERSION, UPGRADES};
pub use writer::{Termed, run_writer};

/// The control store's errors: the store is unreadable or unwritable, or holds what
/// this coordinator cannot read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open {location}: {}", sql_error_text(.source))]
    Open {
        /// The location with any password hidden.
        location: String,
        source: sqlx::Error,
    },
    #[error("{}", sql_error_text(.0))]
    Sql(#[from] sqlx::Error),
    #[error(
        "control store schema version {found} is newer than this coordinator's ({SCHEMA_VERSION}): a newer coordinator upgraded it; upgrade this one (a store is not downgraded)"
    )]
    NewerSchema { found: i64 },
    /// A write decided under a leader's term after a later leader took the store over
    /// ([`Store::fence`]): a deposed leader's write must not land over its successor's.
    #[error(
        "a later leader ({fenced}) has taken the control store over: this write {} is refused",
        write_term(*.term)
    )]
    Fenced { fenced: LeaderFence, term: u64 },
    /// A plan whose writes the store writer gave up on (it refused them for good): nothing
    /// of it runs.
    #[error(
        "plan {0} was not stored (the control store refused its writes; the coordinator's log says why): nothing of it runs"
    )]
    NotStored(String),
    /// A coordinator without etcd whose store another such coordinator serves: two would
    /// each lead, and the later start fences the first's writes while its agents stay with
    /// it (its plans ran on, reported ended, and were stored nowhere).
    #[error(
        "the control store {location} is served by another coordinator without etcd ({holder}): one store has one coordinator, or several with --etcd to elect their leader; stop the other first"
    )]
    InUse { location: String, holder: String },
    /// The store did not answer in time (what was asked, and within how long).
    #[error("the control store does not answer: {0}")]
    Unreachable(String),
    /// A row this coordinator cannot read back (written by a newer one, or damaged).
    #[error("plan {plan}: stored {what} is unreadable: {reason}")]
    Corrupt {
        plan: String,
        what: &'static str,
        reason: String,
    },
}

/// A SQL error as an operator reads it: a server's error by its message (sqlx adds " at line
/// N", a line of PostgreSQL's C source, which reads as a line of the statement), anything
/// else as sqlx says it.
pub fn sql_error_text(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_string(),
        other => other.to_string(),
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A coordinator without etcd's claim on its store ([`Store::claim_sole`]): released when
/// dropped, or when the process ends.
pub enum SoleClaim {
    File(std::fs::File),
    Session(Box<sqlx::AnyConnection>),
    /// An in-memory store: nobody else can open it.
    None,
}

/// Whose a refused write was: a term's, or none (made while this coordinator led none: a
/// deposed leader's "epoch 0" read as a term of that number).
fn write_term(term: u64) -> String {
    if term == 0 {
        "(made while this coordinator led no term)".to_string()
    } else {
        format!("of epoch {term}")
    }
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    is_pg: bool,
    /// Where the store is (connected to again by [`Store::probe`], for the cause of a
    /// failure the pool does not give).
    url: SecretUrl,
}

/// Settings of every session on a PostgreSQL control store. The writer's transactions last
/// milliseconds; one idle for seconds belongs to a coordinator that stopped running.
const STORE_SESSION_SETTINGS: &str = "SET idle_in_transaction_session_timeout = '5s'";

impl Store {
    /// Opens the store: a PostgreSQL URL, or a SQLite file path / `sqlite://` URL (the file
    /// is created when missing, whichever way it was written).
    /// Connects to the store at `location` without touching its tables: a coordinator
    /// without etcd claims the store ([`Store::claim_sole`]) before it upgrades them
    /// ([`Store::migrate`]); refused, it changed nothing (a second coordinator of a newer
    /// version, started by mistake, upgraded the store of the one running, which could then
    /// not start again on it).
    pub async fn connect(location: &SecretUrl) -> Result<Store, StoreError> {
        install_default_drivers();
        let is_pg = is_postgres(location.expose());
        let url = if is_pg {
            location.clone()
        } else {
            SecretUrl::new(sqlite_url(location.expose()))
        };
        if is_pg {
            probe_postgres(&url).await?;
        } else {
            create_private(&url)?;
            probe_sqlite(&url).await?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if is_pg { 8 } else { 4 })
            // A store that does not answer is told in seconds, not sqlx's 30: the store
            // writer's retries say so sooner, and reads that can do without it go on.
            .acquire_timeout(std::time::Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if is_pg {
                        // A coordinator paused or cut off mid-transaction (a stopped
                        // process, a partition) must not hold rows of the shared store
                        // locked for the leader after it: the server ends such a session.
                        sqlx::raw_sql(STORE_SESSION_SETTINGS).execute(conn).await?;
                    } else {
                        // NORMAL keeps commits cheap under WAL (no fsync at each: the shard
                        // journal, not this file, is the truth about what is applied). It is
                        // a setting of each connection, not of the file: set once at open it
                        // held on one of the pool's connections, and a writer's commit on
                        // another waited for a WAL fsync.
                        sqlx::raw_sql("PRAGMA synchronous=NORMAL")
                            .execute(conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url.expose())
            .await
            .map_err(|source| StoreError::Open {
                location: url.redacted(),
                source,
            })?;
        if !is_pg {
            // WAL lets status reads run beside the writer (a mode of the file: once is
            // enough).
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await
                .map_err(StoreError::from)?;
        }
        Ok(Store { pool, is_pg, url })
    }

    /// Opens the store at `location` and brings its tables up to date.
    pub async fn open(location: &SecretUrl) -> Result<Store, StoreError> {
        let store = Store::connect(location).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Claims the store for a coordinator without etcd, for as long as the claim is held
    /// (dropped with the process, however it ends): a lock file beside a SQLite file, a
    /// session advisory lock on a PostgreSQL store. A second coordinator without etcd on
    /// the store is refused at start ([`StoreError::InUse`]). `flotilla operator add
    /// --store` beside a running coordinator takes no claim.
    pub async fn claim_sole(&self) -> Result<SoleClaim, StoreError> {
        let location = self.url.redacted();
        if self.is_pg {
            use sqlx::Connection;
            let mut conn = sqlx::AnyConnection::connect(self.url.expose())
                .await
                .map_err(|source| StoreError::Open {
                    location: location.clone(),
                    source,
                })?;
            let got: bool = sqlx::query_scalar(
                "SELECT pg_try_advisory_lock(hashtext('flotilla.sole-coordinator'))",
            )
            .fetch_one(&mut conn)
            .await
            .map_err(StoreError::from)?;
            if !got {
                return Err(StoreError::InUse {
                    location,
                    holder: "a session of it holds the lock".into(),
                });
            }
            return Ok(SoleClaim::Session(Box::new(conn)));
        }
        let url = self.url.expose();
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        let path = path.split('?').next().unwrap_or(path);
        if path.is_empty() || path.contains(":memory:") {
            return Ok(SoleClaim::None);
        }
        let lock_path = format!("{path}.coordinator-lock");
        let io = |e: std::io::Error| StoreError::InUse {
            location: location.clone(),
            holder: format!("its lock file {lock_path} cannot be taken: {e}"),
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {
                use std::io::{Seek, Write};
                // who holds it, for the next one's refusal
                let _ = file.set_len(0);
                let _ = file.seek(std::io::SeekFrom::Start(0));
                let _ = write!(file, "{}", std::process::id());
                Ok(SoleClaim::File(file))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&lock_path).unwrap_or_default();
                Err(StoreError::InUse {
                    location,
                    holder: format!("process {} holds {lock_path}", pid.trim()),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }

    /// Creates the tables, or brings an older store's up to date ([`schema::UPGRADES`]).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // On SQLite, take the write lock first: a deferred transaction that reads and
        // then writes fails at once (SQLITE_BUSY_SNAPSHOT) when another process (a
        // running coordinator beside `flotilla operator add --store`) wrote meanwhile,
        // where an immediate one waits its turn.
        let mut tx = if self.is_pg {
            self.pool.begin().await
        } else {
            self.pool.begin_with("BEGIN IMMEDIATE").await
        }
        .map_err(StoreError::from)?;
        if self.is_pg {
            // Coordinators of one HA group start together on one store: one
            // migrates, the others wait (CREATE ... IF NOT EXISTS is not safe
            // against a concurrent CREATE).
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('flotilla.control-store'))")
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        for ddl in SCHEMA {
            sqlx::query(*ddl)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        // The leaders' fence (see `fence`), there from the start: a row to lock for the
        // writes that check it and the leader that moves it.
        sqlx::query(
            "INSERT INTO flotilla_meta (key, value) VALUES ('leader_fence', '0 ')
             ON CONFLICT (key) DO NOTHING",
        )
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let found: Option<String> =
            sqlx::query("SELECT value FROM flotilla_meta WHERE key = 'schema_version'")
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::from)?
                .map(|r| r.get(0));
        // A new store has version 1's tables now; an older one is brought up to date.
        let version = found.and_then(|v| v.parse::<i64>().ok()).unwrap_or(1);
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { found: version });
        }
        for (to, ddls) in UPGRADES.iter().filter(|(to, _)| *to > version) {
            for ddl in *ddls {
                sqlx::query(*ddl).execute(&mut *tx).await?;
            }
            tracing::info!(version = to, "control store schema upgraded");
        }
        sqlx::query(
            "INSERT INTO flotilla_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(SCHEMA_VERSION.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await.map_err(StoreError::from)
    }

    /// The embedded coordination backend's epoch: one more than any before it.
    /// This store's identity: a random id written once, when the store is first asked (a
    /// copy of the store is the same store). The coordinators of one etcd group must share
    /// their store: etcd says which one the group uses ([`crate::coordination`]'s
    /// `claim_store`).
    pub async fn identity(&self) -> Result<String, StoreError> {
        let mut tx = self.begin_writing().await?;
        sqlx::query(
            "INSERT INTO flotilla_meta (key, value) VALUES ('store_id', $1)
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(uuid::Uuid::new_v4().simple().to_string())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let id: String = sqlx::query("SELECT value FROM flotilla_meta WHERE key = 'store_id'")
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)?
            .get(0);
        tx.commit().await.map_err(StoreError::from)?;
        Ok(id)
    }

    /// The store's address, password hidden.
    pub fn location(&self) -> String {
        self.url.redacted()
    }

    /// Whether the store answers a read within `within`; Err with why not (on PostgreSQL,
    /// what a connection of its own is told: the pool says only that it timed out).
    pub async fn probe(&self, within: std::time::Duration) -> Result<(), String> {
        let read = tokio::time::timeout(within, sqlx::query("SELECT 1").execute(&self.pool)).await;
        let pool_said = match read {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => sql_error_text(&e),
            Err(_) => format!("no answer within {within:?}"),
        };
        if !self.is_pg {
            return Err(pool_said);
        }
        use sqlx::Connection;
        match tokio::time::timeout(within, sqlx::AnyConnection::connect(self.url.expose())).await {
            // a connection of its own answers: the pool was only busy
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                Ok(())
            }
            Ok(Err(e)) => Err(flotilla_core::secrets::scrub(&sql_error_text(&e))),
            Err(_) => Err(format!("no connection within {within:?}")),
        }
    }

    pub async fn next_epoch(&self) -> Result<u64, StoreError> {
        let mut tx = self.begin_writing().await?;
        if self.is_pg {
            // two coordinators started at once on one store each get an epoch of their own
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('flotilla.control-store'))")
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        let next = stored_epoch(&mut tx).await? + 1;
        store_epoch(&mut tx, next).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(next)
    }

    /// Raises the store's epoch counter to `at_least` (never lowers it): the next start of a
    /// coordinator without etcd leads above it (a shard has seen that epoch).
    pub async fn raise_epoch(&self, at_least: u64) -> Result<(), StoreError> {
        let mut tx = self.begin_writing().await?;
        if stored_epoch(&mut tx).await? < at_least {
            store_epoch(&mut tx, at_least).await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// Takes the store over for the leader of `epoch` in `space` before it reads what to
    /// continue: from the time this commits, a write of an earlier term, or of another
    /// space, is refused ([`StoreError::Fenced`]; each of the writer's transactions checks
    /// the fence last, on PostgreSQL under a share lock of the fence's row, so one that
    /// began before waits for this, or this for it). A leader of another space (the
    /// coordination backend changed, etcd rebuilt) takes it over whatever the epochs.
    /// Returns the fence now stored: a later epoch of the same space when a later leader
    /// took the store over already.
    pub async fn fence(&self, space: &str, epoch: u64) -> Result<LeaderFence, StoreError> {
        self.fence_unless(space, epoch, |stored| {
            stored.space == space && stored.epoch >= epoch
        })
        .await
    }

    /// [`Store::fence`], only when the store was last fenced from another epoch space (or
    /// never): a leader of a new space does it as it begins to lead, before any write of
    /// its term (the store would refuse them all until its fence). Within one space the
    /// fence waits for the flush of the leader's own earlier writes ([`Store::fence`]).
    pub async fn fence_another_space(
        &self,
        space: &str,
        epoch: u64,
    ) -> Result<LeaderFence, StoreError> {
        self.fence_unless(space, epoch, |stored| {
            stored.epoch > 0 && stored.space == space
        })
        .await
    }

    async fn fence_unless(
        &self,
        space: &str,
        epoch: u64,
        keep: impl Fn(&LeaderFence) -> bool,
    ) -> Result<LeaderFence, StoreError> {
        let mut tx = self.begin_writing().await?;
        let stored = read_fence(&mut tx, if self.is_pg { " FOR UPDATE" } else { "" }).await?;
        if keep(&stored) {
            tx.commit().await.map_err(StoreError::from)?;
            return Ok(stored);
        }
        if stored.epoch > 0 && stored.space != space {
            tracing::warn!(
                stored = %stored,
                space,
                epoch,
                "the control store was last led from another epoch space: taking it over (a coordinator still leading there can no longer write to it)"
            );
        }
        let fence = LeaderFence {
            epoch,
            space: space.to_string(),
        };
        // an upsert: the row deleted by hand is there again
        sqlx::query(
            "INSERT INTO flotilla_meta (key, value) VALUES ('leader_fence', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(fence.stored())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(fence)
    }

    /// A transaction that writes: on SQLite with the file's write lock taken at once (a
    /// deferred one that reads first fails when another process wrote meanwhile); on
    /// PostgreSQL a plain one (its statements lock what they need).
    async fn begin_writing(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        if self.is_pg {
            self.pool.begin().await
        } else {
            self.pool.begin_with("BEGIN IMMEDIATE").await
        }
        .map_err(StoreError::from)
    }

    pub async fn plan(&self, id: &str) -> Result<Option<PlanRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, environment, state, policy, spec_hex, epoch, message, submitted_by,
                created_at_ms, updated_at_ms, targets, steps, ends, paused FROM plans WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from)?;
        row.map(|r| plan_row(&r)).transpose()
    }

    pub async fn plans(&self, limit: i64) -> Result<Vec<PlanRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, environment, state, policy, spec_hex, epoch, message, submitted_by,
                created_at_ms, updated_at_ms, targets, steps, ends, paused FROM plans
             ORDER BY created_at_ms DESC, id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        rows.iter().map(plan_row).collect()
    }

    /// Every plan's id.
    pub async fn plan_ids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let rows = sqlx::query("SELECT id FROM plans")
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
    }

    /// Plans that were running (or rolling back) when the coordinator stopped.
    /// The tenants kept for the catch-up after the plans under way, by shard, oldest first
    /// (see `StoreOp::CatchUpKept`); a row that does not decode (written by hand) is left
    /// out, said in the log.
    pub async fn catch_up_kept(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Vec<pb::Tenant>>, StoreError> {
        let rows = sqlx::query(
            "SELECT shard, tenant, tenant_hex FROM catch_up_kept ORDER BY at_ms, shard, tenant",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut kept: std::collections::BTreeMap<String, Vec<pb::Tenant>> = Default::default();
        for r in rows {
            let (shard, tenant, hex_): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            match hex::decode(&hex_)
                .ok()
                .and_then(|b| <pb::Tenant as prost::Message>::decode(b.as_slice()).ok())
            {
                Some(t) => kept.entry(shard).or_default().push(t),
                None => {
                    tracing::warn!(%shard, %tenant, "a tenant kept for a catch-up does not read: left out")
                }
            }
        }
        Ok(kept)
    }

    /// When plan `plan_id` was last asked to run after its submit (`StoreOp::Queued`), if
    /// it was.
    pub async fn queued_at(&self, plan_id: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT queued_at_ms FROM plan_queue WHERE plan_id = $1")
                .bind(plan_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn unfinished_plans(&self) -> Result<Vec<PlanRow>, StoreError> {
        // Every state a plan does not end in, from the states themselves (a new end state
        // cannot be forgotten here and its plans resumed, or worse, undone). A plan
        // awaiting approval has nothing to continue: it keeps waiting, in the store only.
        let open: Vec<PlanState> = PlanState::ALL
            .iter()
            .copied()
            .filter(|p| !p.is_terminal() && *p != PlanState::AwaitingApproval)
            .collect();
        self.plans_in(&open).await
    }

    /// Records the commit decision of an atomic unit for a coordinator without etcd (etcd
    /// holds them otherwise), before any agent is told it: the first decision recorded
    /// for `unit` stands, and is what this returns.
    pub async fn decide(
        &self,
        unit: &str,
        decision: &str,
        epoch: u64,
    ) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO decisions (unit, decision, epoch, at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (unit) DO NOTHING",
        )
        .bind(unit)
        .bind(decision)
        .bind(epoch as i64)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.decision(unit)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                plan: unit.to_string(),
                what: "decision",
                reason: "recorded, then not found".into(),
            })
    }

    /// Whether a coordinator from before the store kept decisions (schema 6) left `plan_id`
    /// committing, its commit decided (the upgrade to 6 recorded it).
    pub async fn committed_before_decisions(&self, plan_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .decision(&format!("{}{plan_id}", schema::COMMITTING_BEFORE_DECISIONS))
            .await?
            .is_some_and(|d| d == "commit"))
    }

    /// The commit decision recorded for `unit` ([`Store::decide`]), if any.
    pub async fn decision(&self, unit: &str) -> Result<Option<String>, StoreError> {
        let found: Option<(String,)> =
            sqlx::query_as("SELECT decision FROM decisions WHERE unit = $1")
                .bind(unit)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.map(|(d,)| d))
    }

    /// The plan a submission with this client's id stored, if one did.
    pub async fn plan_of_request(&self, request_id: &str) -> Result<Option<String>, StoreError> {
        let found: Option<(String,)> =
            sqlx::query_as("SELECT plan_id FROM submissions WHERE request_id = $1")
                .bind(request_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.map(|(id,)| id))
    }

    /// How many steps plans of this coordinator applied on `shard` (stored applied) since
    /// the shard was last retired (`fleet retire`, its audit row: "shard S" or "shard S:
    /// reason"): a shard retired and joined again from another database starts anew.
    pub async fn applied_on(&self, shard: &str) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM steps WHERE shard = $1 AND state = 'applied' \
               AND updated_at_ms > COALESCE((SELECT max(at_ms) FROM audit \
                 WHERE plan_id = '' AND action = 'retire-shard' \
                   AND (detail = $2 OR substr(detail, 1, length($3)) = $3)), 0)",
        )
        .bind(shard)
        .bind(format!("shard {shard}"))
        .bind(format!("shard {shard}: "))
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// The plans not ended (awaiting approval too) with steps on `shard`.
    pub async fn open_plans_on(&self, shard: &str) -> Result<Vec<String>, StoreError> {
        let on: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT plan_id FROM steps WHERE shard = $1")
                .bind(shard)
                .fetch_all(&self.pool)
                .await?;
        let on: std::collections::BTreeSet<String> = on.into_iter().map(|(id,)| id).collect();
        if on.is_empty() {
            return Ok(Vec::new());
        }
        let open: Vec<PlanState> = PlanState::ALL
            .iter()
            .copied()
            .filter(|p| !p.is_terminal())
            .collect();
        Ok(self
            .plans_in(&open)
            .await?
            .into_iter()
            .map(|row| row.id)
            .filter(|id| on.contains(id))
            .collect())
    }

    /// How many plans are in `state` now.
    pub async fn count_in(&self, state: PlanState) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM plans WHERE state = $1")
            .bind(state.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    /// Each target's last failed step, unless that step was applied since (a retry) or a
    /// step of another plan was (the target moved on) (`fleet status`'s "failed last",
    /// rebuilt at start: it was kept in memory only, and a restart lost it; the rule is
    /// [`crate::versions::FleetVersions::record_results`]'s), keyed by (shard, tenant). Two
    /// scans of the steps: their failures, and the applied steps of the targets that have
    /// one, by plan.
    pub async fn last_failures(
        &self,
    ) -> Result<Vec<((String, String), pb::LastFailure)>, StoreError> {
        let mut last: std::collections::HashMap<(String, String), pb::LastFailure> =
            std::collections::HashMap::new();
        let rows = sqlx::query(
            // (not a retired shard's: `fleet retire` let go of its failures)
            "SELECT shard, tenant, migration_id, plan_id, sqlstate, message, updated_at_ms
               FROM steps WHERE state = 'failed' AND shard IN (SELECT shard FROM agents)",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            let key = (r.get::<String, _>(0), r.get::<String, _>(1));
            let at: i64 = r.get(6);
            if last.get(&key).is_some_and(|f| f.at_ms >= at) {
                continue;
            }
            let failure = pb::LastFailure {
                target: crate::versions::target_name(&key.0, &key.1),
                migration_id: r.get(2),
                plan_id: r.get(3),
                sqlstate: r.get(4),
                message: r.get(5),
                at_ms: at,
            };
            last.insert(key, failure);
        }
        if last.is_empty() {
            return Ok(Vec::new());
        }
        // each failed target's last applied step of each plan
        let applied = sqlx::query(
            "SELECT a.shard, a.tenant, a.plan_id, max(a.updated_at_ms) FROM steps a
               JOIN (SELECT DISTINCT shard, tenant FROM steps WHERE state = 'failed') f
                 ON a.shard = f.shard AND a.tenant = f.tenant
              WHERE a.state = 'applied'
              GROUP BY a.shard, a.tenant, a.plan_id",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in &applied {
            let key = (r.get::<String, _>(0), r.get::<String, _>(1));
            let plan_id: String = r.get(2);
            let at: i64 = r.get(3);
            if last
                .get(&key)
                .is_some_and(|f| f.plan_id != plan_id && at >= f.at_ms)
            {
                last.remove(&key);
            }
        }
        Ok(last.into_iter().collect())
    }

    /// Plans whose migrations every target they select should have: those that completed
    /// (with failures within their budget or not), oldest first.
    pub async fn completed_plans(&self) -> Result<Vec<PlanRow>, StoreError> {
        self.plans_in(&[PlanState::Completed, PlanState::CompletedWithFailures])
            .await
    }

    /// Whether plan `undoer` undid migration `migration_id` (a step stored rolled back) on a
    /// target where plan `completed` had found it applied already (its step there stored
    /// `already_applied`): `completed` did nothing there, and the migration is no longer
    /// there.
    pub async fn undone_under(
        &self,
        undoer: &str,
        completed: &str,
        migration_id: &str,
    ) -> Result<bool, StoreError> {
        let found: Option<(i64,)> = sqlx::query_as(
            "SELECT 1 FROM steps r JOIN steps p ON p.migration_id = r.migration_id \
               AND p.shard = r.shard AND p.tenant = r.tenant \
             WHERE r.plan_id = $1 AND p.plan_id = $2 AND r.migration_id = $3 \
               AND r.state = 'rolled_back' AND p.state = 'already_applied' LIMIT 1",
        )
        .bind(undoer)
        .bind(completed)
        .bind(migration_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    /// Every plan for `environment`, oldest first (the promotion gate and `env status`).
    pub async fn environment_plans(&self, environment: &str) -> Result<Vec<PlanRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, environment, state, policy, spec_hex, epoch, message, submitted_by,
                created_at_ms, updated_at_ms, targets, steps, ends, paused FROM plans
             WHERE environment = $1 ORDER BY created_at_ms, id",
        )
        .bind(environment)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        rows.iter().map(plan_row).collect()
    }

    /// Plans in any of `states`, oldest first.
    async fn plans_in(&self, states: &[PlanState]) -> Result<Vec<PlanRow>, StoreError> {
        let sql = format!(
            "SELECT id, name, environment, state, policy, spec_hex, epoch, message, submitted_by,
                created_at_ms, updated_at_ms, targets, steps, ends, paused FROM plans
             WHERE state IN ({}) ORDER BY created_at_ms, id",
            (1..=states.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for state in states {
            q = q.bind(state.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(plan_row).collect()
    }

    /// The last progress of a finished plan's data changes.
    pub async fn data_progress(&self, plan_id: &str) -> Result<Vec<pb::DataProgress>, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT progress_hex FROM data_progress WHERE plan_id = $1 \
             ORDER BY migration_id, shard, tenant",
        )
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        Ok(rows
            .into_iter()
            .filter_map(|(h,)| hex::decode(h).ok())
            .filter_map(|b| pb::DataProgress::decode(b.as_slice()).ok())
            .collect())
    }

    pub async fn steps(&self, plan_id: &str) -> Result<Vec<StepRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {STEP_COLUMNS} FROM steps WHERE plan_id = $1
             ORDER BY shard, tenant, migration_id"
        )))
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        rows.iter().map(|r| step_row(r, plan_id)).collect()
    }

    /// What a plan's status needs of its steps (see [`StepSummary`]); the wave targets
    /// only when `waves`.
    pub async fn step_summary(
        &self,
        plan_id: &str,
        waves: bool,
    ) -> Result<StepSummary, StoreError> {
        let counts = sqlx::query(
            "SELECT migration_id, state, count(*) FROM steps WHERE plan_id = $1
             GROUP BY migration_id, state",
        )
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?
        .iter()
        .map(|r| Ok((r.get(0), stored_state(r.get(1), plan_id)?, r.get(2))))
        .collect::<Result<_, StoreError>>()?;
        let failures = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {STEP_COLUMNS} FROM steps
             WHERE plan_id = $1 AND message <> '' AND state <> 'not_run'
             ORDER BY shard, tenant, migration_id"
        )))
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?
        .iter()
        .map(|r| step_row(r, plan_id))
        .collect::<Result<_, StoreError>>()?;
        let wave_targets = if waves {
            sqlx::query(
                "SELECT wave, shard, tenant,
                    CAST(min(CASE WHEN state IN ('applied', 'already_applied') THEN 1 ELSE 0 END) AS BIGINT),
                    CAST(max(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS BIGINT)
                 FROM steps WHERE plan_id = $1 GROUP BY wave, shard, tenant
                 ORDER BY wave, shard, tenant",
            )
            .bind(plan_id)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?
            .iter()
            .map(|r| WaveTarget {
                wave: r.get(0),
                shard: r.get(1),
                tenant: r.get(2),
                applied: r.get::<i64, _>(3) == 1,
                failed: r.get::<i64, _>(4) == 1,
            })
            .collect()
        } else {
            Vec::new()
        };
        Ok(StepSummary {
            counts,
            failures,
            wave_targets,
        })
    }

    /// A plan's waves in order (none for a plan without waves).
    pub async fn waves(&self, plan_id: &str) -> Result<Vec<WaveRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT idx, name, state, bake_until_ms, gate FROM waves WHERE plan_id = $1 ORDER BY idx",
        )
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WaveRow {
                    idx: r.get(0),
                    name: r.get(1),
                    state: stored_state(r.get(2), plan_id)?,
                    bake_until_ms: r.get(3),
                    gate: r.get(4),
                })
            })
            .collect()
    }

    /// Agents seen before.
    pub async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT shard, labels, tenants, version, last_seen_ms FROM agents ORDER BY shard",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(agent_row).collect())
    }

    /// One shard's agent as last seen, if it ever attached: read on every attach, so one
    /// row rather than the fleet's.
    pub async fn agent(&self, shard: &str) -> Result<Option<AgentRow>, StoreError> {
        let row = sqlx::query(
            "SELECT shard, labels, tenants, version, last_seen_ms FROM agents WHERE shard = $1",
        )
        .bind(shard)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(agent_row))
    }

    pub async fn audit(
        &self,
        plan_id: &str,
    ) -> Result<Vec<(i64, String, String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT at_ms, actor, action, detail FROM audit WHERE plan_id = $1 ORDER BY at_ms, id",
        )
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }
}

/// One entry of the audit trail, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub plan_id: String,
    pub detail: String,
}

impl Store {
    /// The audit trail, oldest first: of one plan or all, from `since_ms` on, at most
    /// `limit` entries (the latest ones).
    pub async fn audit_trail(
        &self,
        plan_id: Option<&str>,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<AuditRow>, StoreError> {
        // The latest `limit`, then put back in order: ids are UUIDv7, so they sort by time
        // within one millisecond too.
        let rows = sqlx::query(
            "SELECT at_ms, actor, action, plan_id, detail FROM audit
             WHERE ($1 = '' OR plan_id = $1) AND at_ms >= $2
             ORDER BY at_ms DESC, id DESC LIMIT $3",
        )
        .bind(plan_id.unwrap_or(""))
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<AuditRow> = rows
            .iter()
            .map(|r| AuditRow {
                at_ms: r.get(0),
                actor: r.get(1),
                action: r.get(2),
                plan_id: r.get(3),
                detail: r.get(4),
            })
            .collect();
        out.reverse();
        Ok(out)
    }
}

impl Store {
    /// A plan's shard cancels and retries, oldest first, as (action, detail): what a new
    /// leader rebuilds the plan's cancelled shards from.
    /// A plan's audit entries of `actions`, oldest first: (action, actor, detail).
    pub async fn plan_audit(
        &self,
        plan_id: &str,
        actions: &[&str],
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT action, actor, detail FROM audit WHERE plan_id = $1 ORDER BY at_ms, id",
        )
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get(1), r.get(2)))
            .filter(|(action, _, _)| actions.contains(&action.as_str()))
            .collect())
    }

    pub async fn cancels_and_retries(
        &self,
        plan_id: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .plan_audit(plan_id, &["cancel", "retry"])
            .await?
            .into_iter()
            .map(|(action, _, detail)| (action, detail))
            .collect())
    }
}

fn agent_row(r: &sqlx::any::AnyRow) -> AgentRow {
    AgentRow {
        shard: r.get(0),
        labels: r.get(1),
        tenants: r.get(2),
        version: r.get(3),
        last_seen_ms: r.get(4),
    }
}

fn plan_row(r: &sqlx::any::AnyRow) -> Result<PlanRow, StoreError> {
    let id: String = r.get(0);
    Ok(PlanRow {
        state: stored_state(r.get(3), &id)?,
        ends: stored_state(r.get(13), &id)?,
        id,
        name: r.get(1),
        environment: r.get(2),
        policy: r.get(4),
        spec_hex: r.get(5),
        epoch: r.get(6),
        message: r.get(7),
        submitted_by: r.get(8),
        created_at_ms: r.get(9),
        updated_at_ms: r.get(10),
        targets: r.get(11),
        steps: r.get(12),
        paused: r.get(14),
    })
}

/// The columns [`step_row`] reads, in its order.
const STEP_COLUMNS: &str =
    "migration_id, shard, tenant, state, sqlstate, message, phase, detail, wave";

/// One step row, read as [`STEP_COLUMNS`] lists it.
fn step_row(r: &sqlx::any::AnyRow, plan_id: &str) -> Result<StepRow, StoreError> {
    Ok(StepRow {
        migration_id: r.get(0),
        shard: r.get(1),
        tenant: r.get(2),
        state: stored_state(r.get(3), plan_id)?,
        sqlstate: r.get(4),
        message: r.get(5),
        phase: r.get(6),
        detail: r.get(7),
        wave: r.get(8),
    })
}

/// A state string read back from the store (plan or step), or why it cannot be.
fn stored_state<S>(value: String, plan_id: &str) -> Result<S, StoreError>
where
    S: std::str::FromStr<Err = flotilla_core::state::UnknownState>,
{
    value.parse().map_err(
        |e: flotilla_core::state::UnknownState| StoreError::Corrupt {
            plan: plan_id.to_string(),
            what: "state",
            reason: e.to_string(),
        },
    )
}

fn is_postgres(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

/// The sqlx URL of a SQLite store: a bare path or a `sqlite:` URL, opened read-write and
/// created when missing (`mode=rwc`) unless the URL says which mode it wants. sqlx's own
/// default for a `sqlite://` URL refuses a file that does not exist yet ("unable to open
/// database file"), which is not what someone pointing a new coordinator at a new file means.
/// One connection to a PostgreSQL store before its pool: the pool's errors are lost in its
/// timeout ("pool timed out while waiting for an open connection", 30 s later), where this
/// says why. A store that refuses the role or has no such database is named at once; one
/// not up yet (refused, starting) is tried for as long as the pool would wait, then named
/// with its last error, so a coordinator started beside its store still comes up.
async fn probe_postgres(url: &SecretUrl) -> Result<(), StoreError> {
    use sqlx::Connection;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let attempt = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            sqlx::AnyConnection::connect(url.expose()),
        )
        .await;
        let error = match attempt {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Ok(Err(e)) => e,
            // no answer: the pool waits, and says so
            Err(_) => return Ok(()),
        };
        let for_good = error
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|code| code.starts_with("28") || code == "3D000");
        if for_good || std::time::Instant::now() >= deadline {
            return Err(StoreError::Open {
                location: url.redacted(),
                source: error,
            });
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The store's epoch counter (0 before any start).
async fn stored_epoch(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<u64, StoreError> {
    let cur: Option<String> = sqlx::query("SELECT value FROM flotilla_meta WHERE key = 'epoch'")
        .fetch_optional(&mut **tx)
        .await
        .map_err(StoreError::from)?
        .map(|r| r.get(0));
    Ok(cur.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
}

async fn store_epoch(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    epoch: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO flotilla_meta (key, value) VALUES ('epoch', $1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(epoch.to_string())
    .execute(&mut **tx)
    .await
    .map_err(StoreError::from)?;
    Ok(())
}

/// One connection to a SQLite store, and a read of its catalog, before its pool: a file
/// that is not a database (a wrong path given) failed each of the pool's connections, and
/// the coordinator said "pool timed out" 30 s later, the cause in sqlx's log lines only.
async fn probe_sqlite(url: &SecretUrl) -> Result<(), StoreError> {
    use sqlx::Connection;
    let open = |source| StoreError::Open {
        location: url.redacted(),
        source,
    };
    let mut conn = sqlx::AnyConnection::connect(url.expose())
        .await
        .map_err(open)?;
    let read = sqlx::query("SELECT count(*) FROM sqlite_master")
        .fetch_one(&mut conn)
        .await;
    let _ = conn.close().await;
    read.map(|_| ()).map_err(open)
}

/// A SQLite store's file, made before SQLite makes it, readable by its owner only (0600):
/// it holds the operators' token hashes and the audit trail, and SQLite would make it with
/// the process's umask (0644, readable by every user of the host). Its `-wal` and `-shm`
/// files take the same mode from it. A file already there is left as it is.
fn create_private(url: &SecretUrl) -> Result<(), StoreError> {
    let location = url.expose();
    if location.contains(":memory:") {
        return Ok(());
    }
    let path = location
        .strip_prefix("sqlite://")
        .or_else(|| location.strip_prefix("sqlite:"))
        .unwrap_or(location);
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() {
        return Ok(());
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        // (a directory that is not there: SQLite names it, as before)
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Open {
            location: url.redacted(),
            source: sqlx::Error::Io(e),
        }),
    }
}

fn sqlite_url(location: &str) -> String {
    if !location.starts_with("sqlite:") {
        return format!("sqlite://{location}?mode=rwc");
    }
    if location.contains(":memory:") || location.contains("mode=") {
        return location.to_string();
    }
    let separator = if location.contains('?') { '&' } else { '?' };
    format!("{location}{separator}mode=rwc")
}

/// The leader that took the control store over last ([`Store::fence`]): its epoch and the
/// space the epoch counts in ([`crate::coordination::Coordination::epoch_space`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderFence {
    /// 0: no leader took the store over yet.
    pub epoch: u64,
    pub space: String,
}

impl LeaderFence {
    /// Whether a write decided under `term` of `space` may land.
    pub fn admits(&self, space: &str, term: u64) -> bool {
        self.epoch == 0 || (self.space == space && self.epoch <= term)
    }

    /// As stored in `flotilla_meta`: `<epoch> <space>`.
    fn stored(&self) -> String {
        format!("{} {}", self.epoch, self.space)
    }
}

impl std::fmt::Display for LeaderFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} of {}", self.epoch, self.space)
    }
}

/// The fence's row, read in `tx` with `lock` (` FOR SHARE`, ` FOR UPDATE` on PostgreSQL:
/// held to the transaction's end, so that a fence and a write wait for each other; the row
/// is there from the store's start, so there is always a row to lock). A row missing or
/// damaged by hand reads as no fence (as before fencing was), said once in the log; the
/// next leader to take the store over writes it again.
async fn read_fence(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    lock: &str,
) -> Result<LeaderFence, StoreError> {
    let value: Option<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT value FROM flotilla_meta WHERE key = 'leader_fence'{lock}"
    )))
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::from)?
    .map(|r| r.get(0));
    let parsed = value.as_deref().and_then(|v| {
        let (epoch, space) = v.split_once(' ')?;
        Some(LeaderFence {
            epoch: epoch.parse().ok()?,
            space: space.to_string(),
        })
    });
    Ok(parsed.unwrap_or_else(|| {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::error!(
                value = ?value,
                "the control store's leader_fence row is missing or damaged: writes are not fenced until a leader takes the store over again"
            )
        });
        LeaderFence {
            epoch: 0,
            space: String::new(),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_core::state::StepState;
    use flotilla_testkit::{PgCluster, TestDir};
    use std::time::Duration;

    /// The epoch space of the tests' writers.
    const SPACE: &str = "etcd 00000000000000aa /flotilla/";
    use tokio::sync::{mpsc, oneshot};

    /// The two kinds of store a test runs alike: a SQLite file and a PostgreSQL database
    /// named `name`, as locations; the directory and the cluster live as long as the
    /// caller keeps them.
    pub(super) async fn both_stores(name: &str) -> (TestDir, PgCluster, [String; 2]) {
        let dir = TestDir::new(name).unwrap();
        let sqlite = dir.join("flotilla.db").to_string_lossy().into_owned();
        let pg = PgCluster::start().await.unwrap();
        pg.create_database(name).await.unwrap();
        let url = pg.url(name);
        (dir, pg, [sqlite, url])
    }

    /// A SQLite store made by the coordinator is its owner's alone (0600), written as a
    /// path or as a `sqlite://` URL; one already there keeps its mode.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_new_sqlite_store_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TestDir::new("store_mode").unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let plain = dir.join("plain.db");
        Store::open(&SecretUrl::new(plain.to_string_lossy()))
            .await
            .unwrap();
        assert_eq!(mode(&plain), 0o600);
        let url = dir.join("url.db");
        Store::open(&SecretUrl::new(format!(
            "sqlite://{}?mode=rwc",
            url.display()
        )))
        .await
        .unwrap();
        assert_eq!(mode(&url), 0o600);
        let shared = dir.join("shared.db");
        std::fs::write(&shared, b"").unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
        Store::open(&SecretUrl::new(shared.to_string_lossy()))
            .await
            .unwrap();
        assert_eq!(mode(&shared), 0o640, "a file there already keeps its mode");
    }

    /// A pending step of shard s0's `tenant` in `wave`, as a plan's insert stores it.
    fn pending_row(migration: &str, tenant: &str, wave: i64) -> StepRow {
        StepRow {
            migration_id: migration.into(),
            shard: "s0".into(),
            tenant: tenant.into(),
            state: StepState::Pending,
            sqlstate: String::new(),
            message: String::new(),
            phase: String::new(),
            detail: String::new(),
            wave,
        }
    }

    /// A step update of shard s0's `tenant` from run `run` (its duration too), carrying
    /// `failure` (SQLSTATE and message) when `state` is failed.
    fn step_update(
        migration: &str,
        tenant: &str,
        state: StepState,
        failure: (&str, &str),
        run: i64,
    ) -> StepUpdate {
        let failed = state == StepState::Failed;
        StepUpdate {
            migration_id: migration.into(),
            shard: "s0".into(),
            tenant: tenant.into(),
            state,
            sqlstate: if failed { failure.0 } else { "" }.into(),
            message: if failed { failure.1 } else { "" }.into(),
            phase: String::new(),
            detail: String::new(),
            duration_ms: run,
            run_id: Some(run),
        }
    }

    /// The store at `location` with its writer running, and the writer's queue.
    async fn opened(location: &str) -> (Store, Queue) {
        let store = Store::open(&SecretUrl::new(location)).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_writer(store.clone(), rx, None, SPACE.into()));
        (store, Queue(tx))
    }

    /// The writer's queue in a test.
    struct Queue(mpsc::UnboundedSender<Termed>);

    impl Queue {
        /// `op` under no leader's term.
        fn send(&self, op: StoreOp) -> Result<(), &'static str> {
            self.0.send((None, op)).map_err(|_| "the writer is gone")
        }

        /// `op` as decided by the leader of `term`.
        fn send_under(&self, term: u64, op: StoreOp) {
            self.0.send((Some(term), op)).unwrap();
        }

        /// A flush under `term`, answered once the writes before it are written or given
        /// up.
        fn flush_under(&self, term: u64) -> oneshot::Receiver<()> {
            let (done, flushed) = oneshot::channel();
            self.send_under(term, StoreOp::Flush(done));
            flushed
        }
    }

    fn state(plan_id: &str, state: PlanState) -> StoreOp {
        StoreOp::PlanState {
            plan_id: plan_id.into(),
            state,
            message: String::new(),
            ends: state,
        }
    }

    /// A refused write says whose it was: a term's, or none (a deposed leader's writes made
    /// after it lost its term read "this write of epoch 0").
    #[test]
    fn a_refused_write_says_whose_it_was() {
        let fenced = |term| {
            StoreError::Fenced {
                fenced: LeaderFence {
                    epoch: 56,
                    space: SPACE.into(),
                },
                term,
            }
            .to_string()
        };
        assert!(
            fenced(49).contains("this write of epoch 49 is refused"),
            "{}",
            fenced(49)
        );
        assert!(
            fenced(0).contains("this write (made while this coordinator led no term) is refused"),
            "{}",
            fenced(0)
        );
    }

    /// A store of version 5 (a coordinator of that version kept its commit decisions in
    /// memory) with an atomic plan it left committing: upgraded, the store says that plan's
    /// commit was decided (a new leader otherwise presumed abort and undid by down SQL what
    /// shards had committed); a plan left running says nothing. A second coordinator
    /// without etcd, refused the store, did not upgrade it first.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_plan_left_committing_before_decisions_were_stored_keeps_its_commit() {
        let (_dir, _pg, locations) = both_stores("committing_v5").await;
        for location in locations {
            let (store, queue) = opened(&location).await;
            for (id, st) in [("p1", PlanState::Committing), ("p2", PlanState::Running)] {
                queue.send_under(
                    1,
                    StoreOp::InsertPlan {
                        plan: PlanRow {
                            state: st,
                            ..plan_row(id, 1, 0)
                        },
                        steps: Vec::new(),
                    },
                );
            }
            queue.flush_under(1).await.unwrap();
            // back to version 5, as that coordinator left it
            for sql in [
                "DROP TABLE decisions",
                "UPDATE flotilla_meta SET value = '5' WHERE key = 'schema_version'",
            ] {
                sqlx::query(sql).execute(&store.pool).await.unwrap();
            }
            let url = SecretUrl::new(location.clone());
            let sole = Store::connect(&url).await.unwrap();
            let _claim = sole.claim_sole().await.unwrap();
            // a second coordinator without etcd is refused before it changes anything
            let second = Store::connect(&url).await.unwrap();
            assert!(
                matches!(second.claim_sole().await, Err(StoreError::InUse { .. })),
                "{location}"
            );
            let version: String =
                sqlx::query_scalar("SELECT value FROM flotilla_meta WHERE key = 'schema_version'")
                    .fetch_one(&store.pool)
                    .await
                    .unwrap();
            assert_eq!(version, "5", "{location}: not upgraded by the refused one");
            sole.migrate().await.unwrap();
            assert!(
                sole.committed_before_decisions("p1").await.unwrap(),
                "{location}"
            );
            assert!(
                !sole.committed_before_decisions("p2").await.unwrap(),
                "{location}"
            );
        }
    }

    /// `undone_under` is per target: an undo counts against a completion only where the
    /// completed plan had found the migration applied already (a catch-up's undo on one new
    /// tenant leaves a completion elsewhere standing).
    #[tokio::test(flavor = "multi_thread")]
    async fn an_undo_counts_against_a_completion_on_its_targets_only() {
        let (_dir, _pg, locations) = both_stores("undone_under").await;
        for location in locations {
            let (store, _queue) = opened(&location).await;
            for (plan, tenant, state) in [
                ("p1", "t1", "rolled_back"),
                ("p2", "t1", "already_applied"),
                ("p3", "t2", "applied"),
                ("p4", "t9", "rolled_back"),
            ] {
                sqlx::query(
                    "INSERT INTO steps (plan_id, migration_id, shard, tenant, state, attempts, \
                     sqlstate, message, duration_ms, updated_at_ms) \
                     VALUES ($1, '001_x', 's0', $2, $3, 1, '', '', 0, 0)",
                )
                .bind(plan)
                .bind(tenant)
                .bind(state)
                .execute(&store.pool)
                .await
                .unwrap();
            }
            assert!(
                store.undone_under("p1", "p2", "001_x").await.unwrap(),
                "{location}"
            );
            assert!(
                !store.undone_under("p1", "p3", "001_x").await.unwrap(),
                "{location}"
            );
            assert!(
                !store.undone_under("p4", "p2", "001_x").await.unwrap(),
                "{location}"
            );
            assert!(
                !store.undone_under("p1", "p2", "002_y").await.unwrap(),
                "{location}"
            );
        }
    }

    /// A leader taking the store over fences it: from then on a write decided under an
    /// earlier term is refused whole (a deposed leader's queued writes, its plan's end),
    /// while its own and a later term's land; the fence never goes back. On SQLite and
    /// PostgreSQL, through the writer and straight to the store.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_deposed_leaders_writes_are_refused_once_a_later_leader_fenced_the_store() {
        let (_dir, _pg, locations) = both_stores("fenced_store").await;
        for location in locations {
            let (store, queue) = opened(&location).await;
            // the deposed leader (epoch 4) wrote its plan before anyone fenced
            queue.send_under(
                4,
                StoreOp::InsertPlan {
                    plan: plan_row("p1", 1, 0),
                    steps: Vec::new(),
                },
            );
            queue.flush_under(4).await.unwrap();
            assert!(store.plan("p1").await.unwrap().is_some(), "{location}");

            assert_eq!(store.fence(SPACE, 5).await.unwrap().epoch, 5, "{location}");
            // the deposed leader's end of the plan, and an audit entry with it, come after
            queue.send_under(4, state("p1", PlanState::Cancelled));
            queue.send_under(
                4,
                StoreOp::Audit(Audit {
                    actor: "alice".into(),
                    action: "cancel",
                    plan_id: "p1".into(),
                    detail: String::new(),
                }),
            );
            queue.flush_under(4).await.unwrap();
            let p1 = store.plan("p1").await.unwrap().unwrap();
            assert_eq!(
                p1.state,
                PlanState::Running,
                "{location}: the deposed leader's write landed"
            );
            assert!(
                store
                    .audit_trail(Some("p1"), 0, 10)
                    .await
                    .unwrap()
                    .is_empty(),
                "{location}"
            );
            let refused = store
                .apply_under(Some((SPACE, 4)), vec![state("p1", PlanState::Failed)])
                .await
                .unwrap_err();
            assert!(
                matches!(&refused, StoreError::Fenced { fenced, term: 4 } if fenced.epoch == 5),
                "{location}: {refused}"
            );

            // the new leader's writes land, and a later term's; the fence does not go back
            queue.send_under(5, state("p1", PlanState::Completed));
            queue.flush_under(5).await.unwrap();
            assert_eq!(
                store.plan("p1").await.unwrap().unwrap().state,
                PlanState::Completed,
                "{location}"
            );
            store
                .apply_under(Some((SPACE, 6)), vec![state("p1", PlanState::Completed)])
                .await
                .unwrap();
            assert_eq!(store.fence(SPACE, 3).await.unwrap().epoch, 5, "{location}");
            let fenced = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Fenced { .. }));
            // epoch 0: a write handed over after its coordinator stopped leading
            let write = store.apply_under(Some((SPACE, 0)), vec![state("p1", PlanState::Failed)]);
            assert!(fenced(write.await), "{location}");

            // A leader of another epoch space (another etcd cluster, the embedded backend)
            // takes the store over at a lower epoch; this space's leaders are fenced out.
            let other = "etcd 00000000000000bb /flotilla/";
            let fence = store.fence(other, 2).await.unwrap();
            assert_eq!(
                (fence.epoch, fence.space.as_str()),
                (2, other),
                "{location}"
            );
            let write = store.apply_under(Some((SPACE, 9)), vec![state("p1", PlanState::Failed)]);
            assert!(
                fenced(write.await),
                "{location}: a write of the old space landed"
            );
            store
                .apply_under(Some((other, 2)), vec![state("p1", PlanState::Completed)])
                .await
                .unwrap();

            // A fence row damaged by hand fences nothing (as before fences were) until the
            // next leader takes the store over, which writes it again.
            sqlx::query("UPDATE flotilla_meta SET value = 'damaged' WHERE key = 'leader_fence'")
                .execute(&store.pool)
                .await
                .unwrap();
            store
                .apply_under(Some((SPACE, 1)), vec![state("p1", PlanState::Completed)])
                .await
                .unwrap();
            assert_eq!(store.fence(other, 3).await.unwrap().epoch, 3, "{location}");
            let write = store.apply_under(Some((other, 2)), vec![state("p1", PlanState::Failed)]);
            assert!(
                fenced(write.await),
                "{location}: the fence was not written again"
            );
            // a write of no leader's (an operator added from the command line) is not fenced
            store
                .apply(vec![state("p1", PlanState::Completed)])
                .await
                .unwrap();
        }
    }

    /// A leader of a new epoch space takes the store over as it begins to lead (its writes
    /// would be refused until then); within one space that waits for its full fence.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_leader_of_another_space_takes_the_store_over_as_it_begins() {
        let (_dir, _pg, locations) = both_stores("another_space").await;
        for location in locations {
            let store = Store::open(&SecretUrl::new(location.clone()))
                .await
                .unwrap();
            // never fenced: taken
            let fence = store.fence_another_space("embedded", 3).await.unwrap();
            assert_eq!(
                (fence.epoch, fence.space.as_str()),
                (3, "embedded"),
                "{location}"
            );
            // the same space, a later epoch: left to the full fence
            let fence = store.fence_another_space("embedded", 4).await.unwrap();
            assert_eq!(fence.epoch, 3, "{location}");
            // another space, a lower epoch: taken, and its writes land
            let fence = store.fence_another_space(SPACE, 1).await.unwrap();
            assert_eq!(
                (fence.epoch, fence.space.as_str()),
                (1, SPACE),
                "{location}"
            );
            store
                .apply_under(
                    Some((SPACE, 1)),
                    vec![StoreOp::InsertPlan {
                        plan: plan_row("p1", 1, 0),
                        steps: Vec::new(),
                    }],
                )
                .await
                .unwrap();
            assert!(store.plan("p1").await.unwrap().is_some(), "{location}");
        }
    }

    /// On PostgreSQL a write checks the fence under a share lock of its row: one that
    /// reaches the check while a new leader's fence is moving the row waits for the fence to
    /// commit, then reads it, and is refused (without the lock it read the old fence and
    /// landed after the new leader's fence, where the new leader no longer looks).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_write_waits_for_a_fence_in_progress_and_is_refused_by_it() {
        let pg = PgCluster::start().await.unwrap();
        pg.create_database("fence_race").await.unwrap();
        let store = Store::open(&SecretUrl::new(pg.url("fence_race")))
            .await
            .unwrap();
        store.fence(SPACE, 4).await.unwrap();
        store
            .apply_under(
                Some((SPACE, 4)),
                vec![StoreOp::InsertPlan {
                    plan: plan_row("p1", 1, 0),
                    steps: Vec::new(),
                }],
            )
            .await
            .unwrap();

        // the new leader's fence, moved and not committed yet
        let pool = pg.pool("fence_race").await.unwrap();
        let mut fence = pool.begin().await.unwrap();
        sqlx::query("UPDATE flotilla_meta SET value = '5 ' || $1 WHERE key = 'leader_fence'")
            .bind(SPACE)
            .execute(&mut *fence)
            .await
            .unwrap();
        let write = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .apply_under(Some((SPACE, 4)), vec![state("p1", PlanState::Cancelled)])
                    .await
            }
        });
        flotilla_testkit::wait_until(
            "the write waits for the fence's row",
            Duration::from_secs(10),
            async || {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = 'fence_race' AND wait_event_type = 'Lock'",
                )
                .fetch_one(&pool)
                .await?;
                Ok(waiting == 1)
            },
        )
        .await
        .unwrap();
        fence.commit().await.unwrap();
        let refused = write.await.unwrap().unwrap_err();
        assert!(
            matches!(&refused, StoreError::Fenced { fenced, term: 4 } if fenced.epoch == 5),
            "{refused}"
        );
        assert_eq!(
            store.plan("p1").await.unwrap().unwrap().state,
            PlanState::Running
        );
    }

    /// Stops the store's server, then hands the writer `op` under term 7 and a flush: the
    /// flush, still unanswered a second later (the writer tries again, or the test fails).
    async fn written_while_stopped(
        pg: &mut PgCluster,
        queue: &Queue,
        op: StoreOp,
    ) -> oneshot::Receiver<()> {
        pg.stop().await.unwrap();
        queue.send_under(7, op);
        let mut flushed = queue.flush_under(7);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), &mut flushed)
                .await
                .is_err(),
            "a flush answered while the store was stopped: the batch was given up"
        );
        flushed
    }

    /// While the store is out of reach (its server stopped), a batch is tried again as
    /// long as this coordinator leads, under the batch's term or a later one of its own,
    /// and lands once the store is back; a batch of a coordinator no longer leading is given
    /// up at its next failure (its successor reads the shards, and its write must not land
    /// over the successor's).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_batch_waits_out_a_store_outage_only_while_its_term_leads() {
        use crate::coordination::Leadership;
        let mut pg = PgCluster::start().await.unwrap();
        pg.create_database("outage").await.unwrap();
        let store = Store::open(&SecretUrl::new(pg.url("outage")))
            .await
            .unwrap();
        let (leading, leadership) = tokio::sync::watch::channel(Leadership::Leader { epoch: 7 });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_writer(
            store.clone(),
            rx,
            Some(leadership),
            SPACE.into(),
        ));
        let queue = Queue(tx);
        for id in ["p1", "p2"] {
            queue.send_under(
                7,
                StoreOp::InsertPlan {
                    plan: plan_row(id, 1, 0),
                    steps: Vec::new(),
                },
            );
        }
        queue.flush_under(7).await.unwrap();

        // leading throughout: the plan's end waits for the server and lands
        let flushed =
            written_while_stopped(&mut pg, &queue, state("p1", PlanState::Completed)).await;
        pg.restart().await.unwrap();
        flushed.await.unwrap();
        assert_eq!(
            store.plan("p1").await.unwrap().unwrap().state,
            PlanState::Completed
        );

        // led again meanwhile under a later epoch of its own: the batch is still tried again
        // (nobody else fenced the store), and lands
        let flushed = written_while_stopped(&mut pg, &queue, state("p1", PlanState::Failed)).await;
        leading.send(Leadership::Leader { epoch: 9 }).unwrap();
        pg.restart().await.unwrap();
        flushed.await.unwrap();
        assert_eq!(
            store.plan("p1").await.unwrap().unwrap().state,
            PlanState::Failed
        );

        // deposed during the outage: the batch is given up, and not written once it is back
        let flushed =
            written_while_stopped(&mut pg, &queue, state("p2", PlanState::Cancelled)).await;
        leading.send(Leadership::Follower { leader: None }).unwrap();
        flushed.await.unwrap();
        pg.restart().await.unwrap();
        assert_eq!(
            store.plan("p2").await.unwrap().unwrap().state,
            PlanState::Running
        );
    }

    /// A running plan's row, for tests that write its steps.
    pub(super) fn plan_row(id: &str, targets: i64, steps: i64) -> PlanRow {
        PlanRow {
            id: id.into(),
            name: id.into(),
            environment: String::new(),
            state: PlanState::Running,
            ends: PlanState::Running,
            policy: "continue".into(),
            spec_hex: String::new(),
            epoch: 1,
            message: String::new(),
            submitted_by: "test".into(),
            created_at_ms: now_ms(),
            updated_at_ms: now_ms(),
            targets,
            steps,
            paused: String::new(),
        }
    }

    /// An op the store refuses for good (here a plan's row inserted twice) costs only
    /// itself: the ops written with it in one batch (an audit entry, the plan's state) are
    /// written one by one after the batch failed, and the flush behind them is answered.
    /// Before, the whole batch was dropped with one log line (a plan's end among them).
    #[tokio::test]
    async fn a_refused_op_does_not_take_its_batch_with_it() {
        let (_dir, _pg, locations) = both_stores("refused_op").await;
        for location in locations {
            let (store, tx) = opened(&location).await;
            tx.send(StoreOp::InsertPlan {
                plan: plan_row("p1", 1, 0),
                steps: Vec::new(),
            })
            .unwrap();
            let (done, flushed) = oneshot::channel();
            tx.send(StoreOp::Flush(done)).unwrap();
            flushed.await.unwrap();

            // one batch: sent before the writer runs again (this test's one thread)
            tx.send(StoreOp::InsertPlan {
                plan: plan_row("p1", 1, 0),
                steps: Vec::new(),
            })
            .unwrap();
            tx.send(StoreOp::Audit(Audit {
                actor: "alice".into(),
                action: "cancel",
                plan_id: "p2".into(),
                detail: String::new(),
            }))
            .unwrap();
            tx.send(StoreOp::PlanState {
                plan_id: "p1".into(),
                state: PlanState::Cancelled,
                message: "cancel requested by alice".into(),
                ends: PlanState::Cancelled,
            })
            .unwrap();
            let (done, flushed) = oneshot::channel();
            tx.send(StoreOp::Flush(done)).unwrap();
            flushed.await.unwrap();

            let p1 = store.plan("p1").await.unwrap().expect("p1");
            assert_eq!(p1.state, PlanState::Cancelled, "{location}");
            let trail = store.audit_trail(Some("p2"), 0, 10).await.unwrap();
            assert_eq!(trail.len(), 1, "{location}");
        }
    }

    /// Tenants kept for a catch-up read back the same from SQLite and PostgreSQL, labels and
    /// all, by shard; kept again, a tenant's row is replaced; taken, they are gone.
    #[tokio::test]
    async fn tenants_kept_for_a_catch_up_read_back() {
        let (_dir, _pg, locations) = both_stores("catch_up_kept").await;
        for location in locations {
            let (store, tx) = opened(&location).await;
            let tenant = |name: &str, tier: &str| pb::Tenant {
                name: name.into(),
                labels: [("tier".to_string(), tier.to_string())].into(),
                ..Default::default()
            };
            tx.send(StoreOp::CatchUpKept {
                shard: "s1".into(),
                tenants: vec![tenant("t1", "free"), tenant("t2", "free")],
            })
            .unwrap();
            tx.send(StoreOp::CatchUpKept {
                shard: "s2".into(),
                tenants: vec![tenant("t1", "gold")],
            })
            .unwrap();
            // kept again (a second discovery): replaced, not doubled
            tx.send(StoreOp::CatchUpKept {
                shard: "s1".into(),
                tenants: vec![tenant("t2", "gold")],
            })
            .unwrap();
            let (done, flushed) = oneshot::channel();
            tx.send(StoreOp::Flush(done)).unwrap();
            flushed.await.unwrap();
            let kept = store.catch_up_kept().await.unwrap();
            let names = |shard: &str| -> Vec<(String, String)> {
                kept[shard]
                    .iter()
                    .map(|t| (t.name.clone(), t.labels["tier"].clone()))
                    .collect()
            };
            assert_eq!(
                names("s1"),
                [("t1".into(), "free".into()), ("t2".into(), "gold".into())],
                "{location}"
            );
            assert_eq!(names("s2"), [("t1".into(), "gold".into())], "{location}");
            tx.send(StoreOp::CatchUpTaken {
                tenants: vec![("s1".into(), "t1".into()), ("s1".into(), "t2".into())],
            })
            .unwrap();
            let (done, flushed) = oneshot::channel();
            tx.send(StoreOp::Flush(done)).unwrap();
            flushed.await.unwrap();
            let kept = store.catch_up_kept().await.unwrap();
            assert_eq!(kept.keys().collect::<Vec<_>>(), ["s2"], "{location}");
        }
    }

    /// The audit trail reads back the same from SQLite and PostgreSQL: by plan, since a
    /// time, the latest `limit` in order.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_audit_trail_is_queried_by_plan_time_and_limit() {
        let (_dir, _pg, locations) = both_stores("audit_store").await;
        for location in locations {
            let (store, tx) = opened(&location).await;
            for (actor, action, plan) in [
                ("alice", "submit", "p1"),
                ("bob", "approve", "p1"),
                ("carol", "submit", "p2"),
                ("dan", "approve", "p1"),
            ] {
                tx.send(StoreOp::Audit(Audit {
                    actor: actor.into(),
                    action,
                    plan_id: plan.into(),
                    detail: format!("{action} by {actor}"),
                }))
                .unwrap();
            }
            let (done, flushed) = oneshot::channel();
            tx.send(StoreOp::Flush(done)).unwrap();
            flushed.await.unwrap();

            let p1 = store.audit_trail(Some("p1"), 0, 1000).await.unwrap();
            let who: Vec<&str> = p1.iter().map(|a| a.actor.as_str()).collect();
            assert_eq!(who, ["alice", "bob", "dan"], "{location}");
            assert!(p1.iter().all(|a| a.at_ms > 0 && a.plan_id == "p1"));
            let latest = store.audit_trail(None, 0, 2).await.unwrap();
            let who: Vec<&str> = latest.iter().map(|a| a.actor.as_str()).collect();
            assert_eq!(who, ["carol", "dan"], "{location}");
            let none = store
                .audit_trail(None, now_ms() + 60_000, 10)
                .await
                .unwrap();
            assert!(none.is_empty(), "{location}");
        }
    }

    /// An agent's row reads back the same from SQLite and PostgreSQL, alone by its shard
    /// (an attach reads only its own) or with the others.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_agent_row_is_read_by_its_shard_alike_on_both_stores() {
        let (_dir, _pg, locations) = both_stores("agents_store").await;
        for location in locations {
            let (store, tx) = opened(&location).await;
            assert!(
                store.agent("shard_a").await.unwrap().is_none(),
                "{location}"
            );
            for (shard, tenant) in [("shard_a", "tenant_1"), ("shard_b", "tenant_2")] {
                tx.send(StoreOp::Agent {
                    shard: shard.into(),
                    labels: r#"{"region":"eu"}"#.into(),
                    tenants: format!(r#"[["{tenant}",{{"industry":"retail"}}]]"#),
                    version: "0.1.0".into(),
                    seen_ms: 0,
                })
                .unwrap();
            }
            let (done, flushed) = oneshot::channel();
            tx.send(StoreOp::Flush(done)).unwrap();
            flushed.await.unwrap();

            let a = store
                .agent("shard_a")
                .await
                .unwrap()
                .expect("shard_a's row");
            assert_eq!(a.shard, "shard_a", "{location}");
            let tenants: Vec<String> = a.tenants().into_iter().map(|(t, _)| t).collect();
            assert_eq!(tenants, ["tenant_1"], "{location}");
            assert_eq!(a.labels().get("region").map(String::as_str), Some("eu"));
            assert!(a.last_seen_ms > 0 && a.version == "0.1.0");
            assert!(
                store.agent("shard_c").await.unwrap().is_none(),
                "{location}"
            );
            let all: Vec<String> = store
                .agents()
                .await
                .unwrap()
                .into_iter()
                .map(|a| a.shard)
                .collect();
            assert_eq!(all, ["shard_a", "shard_b"], "{location}");
        }
    }

    /// Each target's last failure as a restarted coordinator rebuilds it, alike on both
    /// stores: kept through the failed plan's other steps applied there after it (`policy =
    /// continue` goes on with them), cleared by a step of another plan applied there since
    /// or by the failed step itself applied (a retry).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_last_failure_is_kept_through_its_own_plans_later_steps() {
        let (_dir, _pg, locations) = both_stores("last_failures_store").await;
        for location in locations {
            let (store, tx) = opened(&location).await;
            tx.send(StoreOp::Agent {
                shard: "s0".into(),
                labels: "{}".into(),
                tenants: "[]".into(),
                version: "0.1.0".into(),
                seen_ms: 0,
            })
            .unwrap();
            let row = |m: &str, tenant: &str| pending_row(m, tenant, 0);
            let update = |m: &str, tenant: &str, state: StepState| {
                step_update(m, tenant, state, ("23514", "violates check constraint"), 1)
            };
            // one write after another, each flushed: the later one is no earlier
            let write = |plan_id: &str, updates: Vec<StepUpdate>| {
                tx.send(StoreOp::Steps {
                    plan_id: plan_id.into(),
                    updates,
                })
                .unwrap();
                let (done, flushed) = oneshot::channel();
                tx.send(StoreOp::Flush(done)).unwrap();
                flushed
            };
            tx.send(StoreOp::InsertPlan {
                plan: plan_row("p1", 3, 5),
                steps: vec![
                    row("a", "t1"),
                    row("b", "t1"),
                    row("a", "t2"),
                    row("a", "t3"),
                ],
            })
            .unwrap();
            tx.send(StoreOp::InsertPlan {
                plan: plan_row("p2", 1, 1),
                steps: vec![row("c", "t2")],
            })
            .unwrap();
            write(
                "p1",
                vec![
                    update("b", "t1", StepState::Failed),
                    update("a", "t2", StepState::Failed),
                    update("a", "t3", StepState::Failed),
                ],
            )
            .await
            .unwrap();
            write("p1", vec![update("a", "t1", StepState::Applied)])
                .await
                .unwrap();
            write("p2", vec![update("c", "t2", StepState::Applied)])
                .await
                .unwrap();
            write("p1", vec![update("a", "t3", StepState::Applied)])
                .await
                .unwrap();
            let found = store.last_failures().await.unwrap();
            let failed: Vec<(&str, &str, &str)> = found
                .iter()
                .map(|((_, tenant), f)| {
                    (tenant.as_str(), f.migration_id.as_str(), f.plan_id.as_str())
                })
                .collect();
            assert_eq!(failed, [("t1", "b", "p1")], "{location}");
        }
    }

    /// A plan's steps counted by the store, alike on SQLite and PostgreSQL: per migration
    /// and state, the steps that carry an error (a step not run keeps none), and each wave's
    /// targets (applied: every step; failed: any).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_plans_steps_are_summed_up_alike_on_both_stores() {
        let (_dir, _pg, locations) = both_stores("summary_store").await;
        for location in locations {
            let (store, tx) = opened(&location).await;
            let row = pending_row;
            tx.send(StoreOp::InsertPlan {
                plan: plan_row("p1", 3, 6),
                steps: vec![
                    row("a", "t1", 0),
                    row("b", "t1", 0),
                    row("a", "t2", 1),
                    row("b", "t2", 1),
                    row("a", "t3", 1),
                    row("b", "t3", 1),
                ],
            })
            .unwrap();
            let update = |m: &str, tenant: &str, state: StepState, message: &str| StepUpdate {
                migration_id: m.into(),
                shard: "s0".into(),
                tenant: tenant.into(),
                state,
                sqlstate: if message.is_empty() { "" } else { "42P01" }.into(),
                message: message.into(),
                phase: String::new(),
                detail: String::new(),
                duration_ms: 1,
                run_id: Some(1),
            };
            tx.send(StoreOp::Steps {
                plan_id: "p1".into(),
                updates: vec![
                    update("a", "t1", StepState::Applied, ""),
                    update("b", "t1", StepState::AlreadyApplied, ""),
                    update("a", "t2", StepState::Applied, ""),
                    update(
                        "b",
                        "t2",
                        StepState::Failed,
                        "relation \"x\" does not exist",
                    ),
                    update("a", "t3", StepState::NotRun, "kept from an earlier attempt"),
                ],
            })
            .unwrap();
            let (done, flushed) = oneshot::channel();
            tx.send(StoreOp::Flush(done)).unwrap();
            flushed.await.unwrap();

            let summary = store.step_summary("p1", true).await.unwrap();
            let mut counts = summary.counts.clone();
            counts.sort_by(|x, y| (&x.0, x.1.as_str()).cmp(&(&y.0, y.1.as_str())));
            let expected: Vec<(String, StepState, i64)> = vec![
                ("a".into(), StepState::Applied, 2),
                ("a".into(), StepState::NotRun, 1),
                ("b".into(), StepState::AlreadyApplied, 1),
                ("b".into(), StepState::Failed, 1),
                ("b".into(), StepState::Pending, 1),
            ];
            assert_eq!(counts, expected, "{location}");
            let failed: Vec<(&str, &str, &str)> = summary
                .failures
                .iter()
                .map(|f| {
                    (
                        f.migration_id.as_str(),
                        f.tenant.as_str(),
                        f.sqlstate.as_str(),
                    )
                })
                .collect();
            assert_eq!(failed, [("b", "t2", "42P01")], "{location}");
            let waves: Vec<(i64, &str, bool, bool)> = summary
                .wave_targets
                .iter()
                .map(|t| (t.wave, t.tenant.as_str(), t.applied, t.failed))
                .collect();
            assert_eq!(
                waves,
                [
                    (0, "t1", true, false),
                    (1, "t2", false, true),
                    (1, "t3", false, false)
                ],
                "{location}"
            );
            let without = store.step_summary("p1", false).await.unwrap();
            assert!(without.wave_targets.is_empty(), "{location}");
            assert_eq!(without.failures.len(), 1, "{location}");
            assert!(
                store
                    .step_summary("p2", true)
                    .await
                    .unwrap()
                    .counts
                    .is_empty(),
                "{location}"
            );
        }
    }

    /// One batch of several ops of step updates (one per agent's results in a rollout) is
    /// written as one: a step updated by two ops ends in the later state with both attempts
    /// counted and recorded, and an op of another plan, or after a plan's insert, lands too.
    #[tokio::test(flavor = "multi_thread")]
    async fn step_updates_of_one_batch_add_up_as_if_applied_one_by_one() {
        let (_dir, _pg, locations) = both_stores("coalesce_store").await;
        for location in locations {
            let store = Store::open(&SecretUrl::new(location.as_str()))
                .await
                .unwrap();
            let plan = |id: &str| StoreOp::InsertPlan {
                plan: plan_row(id, 1, 2),
                steps: ["a", "b"]
                    .into_iter()
                    .map(|m| pending_row(m, "t1", 0))
                    .collect(),
            };
            let update = |m: &str, state: StepState, run: i64| {
                step_update(m, "t1", state, ("40P01", "deadlock"), run)
            };
            let steps = |plan_id: &str, updates| StoreOp::Steps {
                plan_id: plan_id.into(),
                updates,
            };
            store
                .apply(vec![
                    plan("p1"),
                    steps("p1", vec![update("a", StepState::Failed, 1)]),
                    StoreOp::PlanState {
                        plan_id: "p1".into(),
                        state: PlanState::Running,
                        message: "retrying a".into(),
                        ends: PlanState::Running,
                    },
                    steps(
                        "p1",
                        vec![
                            update("a", StepState::Applied, 2),
                            update("b", StepState::Applied, 3),
                        ],
                    ),
                    plan("p2"),
                    steps("p2", vec![update("a", StepState::Applied, 4)]),
                    steps("p1", vec![update("b", StepState::Applied, 5)]),
                ])
                .await
                .unwrap();
            let rows: Vec<(String, String, String, i64, String)> = sqlx::query(
                "SELECT plan_id, migration_id, state, attempts, message FROM steps
                 ORDER BY plan_id, migration_id",
            )
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect();
            let row = |p: &str, m: &str, attempts: i64| {
                (
                    p.into(),
                    m.into(),
                    "applied".into(),
                    attempts,
                    String::new(),
                )
            };
            assert_eq!(
                rows,
                [
                    row("p1", "a", 2),
                    row("p1", "b", 2),
                    row("p2", "a", 1),
                    ("p2".into(), "b".into(), "pending".into(), 0, String::new()),
                ],
                "{location}"
            );
            let tries: Vec<(String, String, i64, String)> = sqlx::query(
                "SELECT plan_id, migration_id, run_id, outcome FROM attempts ORDER BY run_id",
            )
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
            let tried = |p: &str, m: &str, run: i64, outcome: &str| {
                (p.to_string(), m.to_string(), run, outcome.to_string())
            };
            assert_eq!(
                tries,
                [
                    tried("p1", "a", 1, "failed"),
                    tried("p1", "a", 2, "applied"),
                    tried("p1", "b", 3, "applied"),
                    tried("p2", "a", 4, "applied"),
                    tried("p1", "b", 5, "applied"),
                ],
                "{location}"
            );
        }
    }

    #[test]
    fn sqlite_locations_are_created_when_missing() {
        assert_eq!(sqlite_url("flotilla.db"), "sqlite://flotilla.db?mode=rwc");
        assert_eq!(
            sqlite_url("sqlite:///var/lib/f.db"),
            "sqlite:///var/lib/f.db?mode=rwc"
        );
        assert_eq!(
            sqlite_url("sqlite://f.db?cache=shared"),
            "sqlite://f.db?cache=shared&mode=rwc"
        );
        assert_eq!(sqlite_url("sqlite://f.db?mode=ro"), "sqlite://f.db?mode=ro");
        assert_eq!(sqlite_url("sqlite::memory:"), "sqlite::memory:");
    }

    /// `synchronous` is a setting of each SQLite connection: every one of the pool has it.
    #[tokio::test]
    async fn every_sqlite_connection_commits_without_an_fsync_each() {
        let dir = TestDir::new("sqlite-synchronous").unwrap();
        let path = dir.join("flotilla.db").to_string_lossy().into_owned();
        let store = Store::open(&SecretUrl::new(path)).await.unwrap();
        // two connections at once: the pool opens a second one beside the first
        let mut a = store.pool.acquire().await.unwrap();
        let mut b = store.pool.acquire().await.unwrap();
        for conn in [&mut a, &mut b] {
            let (mode,): (i64,) = sqlx::query_as("PRAGMA synchronous")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(mode, 1, "synchronous=NORMAL on every connection");
            let (journal,): (String,) = sqlx::query_as("PRAGMA journal_mode")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(journal, "wal");
        }
    }

    /// `--store sqlite://PATH` of a file that does not exist yet makes it (issue 16).
    #[tokio::test]
    async fn a_sqlite_url_to_a_new_file_opens() {
        let dir = TestDir::new("sqlite-url-store").unwrap();
        let path = dir.join("fresh.db");
        let url = format!("sqlite://{}", path.to_string_lossy());
        let store = Store::open(&SecretUrl::new(url)).await.unwrap();
        assert!(store.plans(10).await.unwrap().is_empty());
        assert!(dir.join("fresh.db").exists());
    }
}
