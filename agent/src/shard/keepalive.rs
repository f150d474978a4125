//! TCP keepalives on the agent's connections to its shard, so that a database that vanished
//! from the network (a host that died, a partition, a dropped NAT mapping, a failover that
//! did not close its sockets) ends the agent's wait instead of leaving it blocked for ever.
//!
//! A statement in flight waits for its answer on a socket with nothing left to send: no
//! retransmission ever fails, and without keepalive probes the read waits until the host's
//! TCP gives up, which by default is never. libpq turns keepalives on by default; the driver
//! (sqlx 0.9) opens its sockets itself and has no setting for them (sqlx issue #3540), so
//! after each connection is made the agent arms every TCP socket of its process that has no
//! keepalive yet: probes after 15 s of silence, every 5 s, the connection dropped after 3
//! unanswered (or after 30 s of data sent and never acknowledged, `TCP_USER_TIMEOUT`). The
//! run then fails as a lost connection does (the journal and checkpoints decide what
//! committed, and it runs again). A socket that already has keepalive (set by whoever opened
//! it) is left as it is.
//!
//! The server side is asked for the same in the connection's startup options (see
//! [`SERVER_KEEPALIVES`]): a backend left waiting for a vanished agent (between statements,
//! or its statement done) then notices within a minute and releases the locks of the
//! transaction that agent had open, instead of holding them (an ACCESS EXCLUSIVE lock on a
//! tenant's table, in the worst case) for the two hours of the operating system's default.
//! (One still running its statement is ended by `client_connection_check_interval`, see
//! `connect::check_connection`, on servers 14 and later.)
use std::time::Duration;

/// Silence before the first probe.
pub(crate) const IDLE: Duration = Duration::from_secs(15);
/// Between probes.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection is dropped.
pub(crate) const COUNT: u32 = 3;
/// Data sent and never acknowledged for this long drops the connection.
pub(crate) const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// The same keepalives, asked of the server's side of each connection (startup options;
/// ignored on a Unix socket). A DSN whose own `options` set any of them keeps its own.
pub(crate) const SERVER_KEEPALIVES: [(&str, &str); 3] = [
    ("tcp_keepalives_idle", "15"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
];

/// Arms every TCP socket of the process that has no keepalive yet; returns how many it
/// armed. Called after each connection to the shard is made (it cannot name the driver's
/// socket, so it looks at them all: other TCP sockets of the agent, to its coordinator or
/// etcd, are better off armed too).
pub(crate) fn arm_open_sockets() -> usize {
    #[cfg(target_os = "linux")]
    {
        linux::arm_open_sockets()
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::os::fd::RawFd;

    use super::{COUNT, IDLE, INTERVAL, USER_TIMEOUT};

    pub(super) fn arm_open_sockets() -> usize {
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            return 0;
        };
        // sockets only, by the link's name (`socket:[inode]`)
        let fds: Vec<RawFd> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let fd = e.file_name().to_str()?.parse().ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                target.to_str()?.starts_with("socket:").then_some(fd)
            })
            .collect();
        fds.into_iter()
            .filter(|&fd| arm(fd).unwrap_or(false))
            .count()
    }

    /// Arms `fd` if it is a TCP socket without keepalive. The number is read from the fd
    /// table and may be closed (or reused) meanwhile by another thread: the socket options
    /// are asked and set on the number as it is, never duplicated or closed here (closing a
    /// duplicate of a file would release the process's POSIX locks on it), so a number
    /// reused by a file only fails (ENOTSOCK), and one reused by another socket arms that.
    fn arm(s: RawFd) -> Option<bool> {
        if get(s, libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
            return Some(false);
        }
        let domain = get(s, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            return Some(false);
        }
        if get(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0 {
            return Some(false);
        }
        let secs = |d: std::time::Duration| d.as_secs() as libc::c_int;
        set(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(IDLE))?;
        set(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(INTERVAL))?;
        set(
            s,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPCNT,
            COUNT as libc::c_int,
        )?;
        let user_timeout = USER_TIMEOUT.as_millis() as libc::c_int;
        set(s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_timeout)?;
        set(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        Some(true)
    }

    pub(super) fn get(fd: RawFd, level: libc::c_int, name: libc::c_int) -> Option<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len point to a c_int and its size, as getsockopt expects.
        let rc =
            unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
        (rc == 0).then_some(value)
    }

    fn set(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> Option<()> {
        // SAFETY: value is a c_int, its size given, as setsockopt expects.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        (rc == 0).then_some(())
    }
}

/// Whether a socket of this process is armed: (keepalive on, idle seconds, user timeout ms).
/// For tests.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn armed(fd: std::os::fd::RawFd) -> Option<(bool, i32, i32)> {
    Some((
        linux::get(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0,
        linux::get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
        linux::get(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)?,
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// A TCP socket opened without keepalive is armed; a Unix socket and a TCP socket whose
    /// opener set keepalive itself are left as they are.
    #[test]
    fn tcp_sockets_without_keepalive_are_armed_and_others_left() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let plain = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let own = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let own_ref = socket_keepalive_on(&own);
        let (unix_a, _unix_b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!armed(plain.as_raw_fd()).unwrap().0);

        assert!(arm_open_sockets() >= 1);

        let (on, idle, user_timeout) = armed(plain.as_raw_fd()).unwrap();
        assert!(on);
        assert_eq!(idle, IDLE.as_secs() as i32);
        assert_eq!(user_timeout, USER_TIMEOUT.as_millis() as i32);
        // the opener's own keepalive (idle 7 s, no user timeout) is kept
        assert_eq!(armed(own.as_raw_fd()).unwrap(), (true, own_ref, 0));
        assert!(linux::get(unix_a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE) == Some(0));
    }

    fn socket_keepalive_on(s: &std::net::TcpStream) -> i32 {
        let fd = s.as_raw_fd();
        let one: libc::c_int = 1;
        let idle: libc::c_int = 7;
        let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: c_ints and their size, as setsockopt expects, on a socket we own.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_KEEPALIVE,
                (&raw const one).cast(),
                size,
            );
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPIDLE,
                (&raw const idle).cast(),
                size,
            );
        }
        idle
    }
}
