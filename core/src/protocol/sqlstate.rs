//! The SQLSTATE codes Flotilla acts on, named once. (Others are only reported.)

/// Raised by `flotilla.check_fence` when a step's epoch is older than the shard's.
pub const FENCED: &str = "FL002";
/// Raised by `flotilla.check_verify` when a verify query is not true.
pub const VERIFY_FAILED: &str = "FL003";
/// Raised by `flotilla.advance_checkpoint` (and the statements' and undo's advances) when
/// the checkpoint is not where the caller found it: another run's session did that batch.
pub const CHECKPOINT_MOVED: &str = "FL004";
/// Raised by `flotilla.refuse_journaled` when a non-transactional step or data change is
/// about to write its first checkpoint and the journal already has it: another run of the
/// same step applied it first.
pub const ALREADY_JOURNALED: &str = "FL005";
/// Raised by `flotilla.check_tenant_schema` when a tenant's schema is not the one its
/// journal rows were written in (dropped and made again under a plan under way).
pub const SCHEMA_CHANGED: &str = "FL006";
/// `unique_violation`: with the journal's primary key, another session applied the step first.
pub const UNIQUE_VIOLATION: &str = "23505";
/// Class 28, `invalid_authorization_specification`: waiting does not make it better.
pub const CLASS_AUTH: &str = "28";

/// Class 53, `insufficient_resources`: "out of shared memory" (53200) when the lock table
/// is full. PostgreSQL's hint names the setting to raise, so the step's message carries it.
pub const CLASS_INSUFFICIENT_RESOURCES: &str = "53";

/// `lock_not_available`: `lock_timeout` ran out (a schema step retries it).
pub const LOCK_NOT_AVAILABLE: &str = "55P03";
/// `undefined_object`: COMMIT/ROLLBACK PREPARED of a gid that is not (or no longer) prepared.
pub const UNDEFINED_OBJECT: &str = "42704";
/// `serialization_failure`: a batch undone by a concurrent change; it runs again.
pub const SERIALIZATION_FAILURE: &str = "40001";
/// `deadlock_detected`: a batch undone by a deadlock with an application session; it runs again.
pub const DEADLOCK_DETECTED: &str = "40P01";
/// Both of the above: the transaction was undone by a conflict with another session, and
/// doing it again may well succeed.
pub const CONFLICTS: [&str; 2] = [SERIALIZATION_FAILURE, DEADLOCK_DETECTED];
/// `admin_shutdown`, `crash_shutdown`, `cannot_connect_now`, `idle_session_timeout`: the
/// server went away or is not up yet, or ended a session left idle (a data change paused
/// longer than the server's idle_session_timeout); what the failed transaction did was
/// undone with it.
pub const SERVER_GONE: [&str; 4] = ["57P01", CRASH_SHUTDOWN, "57P03", "57P05"];
/// `crash_shutdown`: the server ends every session after another of its processes crashed
/// (and recovers): nothing the session was doing was at fault.
pub const CRASH_SHUTDOWN: &str = "57P02";
