//! The SQLSTATE codes Flotilla acts on, named once. (Others are only reported.)

/// `lock_not_available`: `lock_timeout` ran out (a schema step retries it).
pub const LOCK_NOT_AVAILABLE: &str = "55P03";
/// `undefined_object`: COMMIT/ROLLBACK PREPARED of a gid that is not (or no longer) prepared.
pub const UNDEFINED_OBJECT: &str = "42704";
/// `serialization_failure`: a batch undone by a concurrent change; it runs again.
pub const SERIALIZATION_FAILURE: &str = "40001";
/// `deadlock_detected`: a batch undone by a deadlock with an application session; it runs again.
pub const DEADLOCK_DETECTED: &str = "40P01";
/// `admin_shutdown`, `crash_shutdown`, `cannot_connect_now`: the server went away or is
/// not up yet; what the failed transaction did was undone with it.
pub const SERVER_GONE: [&str; 3] = ["57P01", "57P02", "57P03"];

/// Whether a batch that failed with `code` can simply run again.
pub fn is_transient_conflict(code: &str) -> bool {
    code == SERIALIZATION_FAILURE || code == DEADLOCK_DETECTED
}

/// Whether `code` says the server went away (or is starting).
pub fn is_server_gone(code: &str) -> bool {
    SERVER_GONE.contains(&code)
}
