//! A TCP proxy for fault tests: put it between a client and a server, then
//! `cut()` the link (connections reset, new ones refused), `heal()` it, or
//! `delay()` the traffic.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::free_port;
use super::wait::wait_until;

const BIND_ATTEMPTS: usize = 5;
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

struct Shared {
    upstream: SocketAddr,
    delay: Mutex<Duration>,
    /// Bumped by every `cut()`; tasks watching it drop their sockets.
    cuts: watch::Sender<u64>,
    active: AtomicUsize,
    accepted: AtomicUsize,
}

/// Forwards connections on `127.0.0.1:<free port>` to `upstream`. Must be
/// created and used inside a tokio runtime; shuts down on drop.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<TcpProxy> {
        let mut last_error = None;
        for _ in 0..BIND_ATTEMPTS {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    let shared = Arc::new(Shared {
                        upstream,
                        delay: Mutex::new(Duration::ZERO),
                        cuts: watch::channel(0).0,
                        active: AtomicUsize::new(0),
                        accepted: AtomicUsize::new(0),
                    });
                    let acceptor = spawn_acceptor(listener, shared.clone());
                    return Ok(TcpProxy {
                        addr,
                        shared,
                        acceptor: Mutex::new(Some(acceptor)),
                    });
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("at least one attempt")).context("binding the TCP proxy")
    }

    /// Where clients should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Connections currently being forwarded.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    pub fn is_cut(&self) -> bool {
        self.acceptor.lock().unwrap().is_none()
    }

    /// Delays every chunk of data, both ways, by `delay` from now on
    /// (`Duration::ZERO` turns it off).
    pub fn delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap() = delay;
    }

    /// Resets all connections and closes the listening socket, so new
    /// connections are refused. Returns once both have happened.
    pub async fn cut(&self) -> anyhow::Result<()> {
        let acceptor = self.acceptor.lock().unwrap().take();
        self.shared.cuts.send_modify(|generation| *generation += 1);
        if let Some(acceptor) = acceptor {
            acceptor.abort();
            let _ = acceptor.await;
        }
        let shared = self.shared.clone();
        wait_until(
            "the proxy's connections to close",
            Duration::from_secs(10),
            move || {
                let shared = shared.clone();
                async move { Ok(shared.active.load(Ordering::SeqCst) == 0) }
            },
        )
        .await
    }

    /// Listens again on the same port after [`TcpProxy::cut`].
    pub async fn heal(&self) -> anyhow::Result<()> {
        if !self.is_cut() {
            return Ok(());
        }
        let addr = self.addr;
        let listener = super::wait::wait_for(
            "the proxy to re-bind its port",
            Duration::from_secs(10),
            move || async move { Ok(Some(TcpListener::bind(addr).await?)) },
        )
        .await?;
        let acceptor = spawn_acceptor(listener, self.shared.clone());
        *self.acceptor.lock().unwrap() = Some(acceptor);
        Ok(())
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.cuts.send_modify(|generation| *generation += 1);
        if let Some(acceptor) = self.acceptor.lock().unwrap().take() {
            acceptor.abort();
        }
    }
}

fn spawn_acceptor(listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    let mut cuts = shared.cuts.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cuts.changed() => return,
                accepted = listener.accept() => {
                    let Ok((client, _)) = accepted else { continue };
                    shared.accepted.fetch_add(1, Ordering::SeqCst);
                    shared.active.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(handle_connection(client, shared.clone(), shared.cuts.subscribe()));
                }
            }
        }
    })
}

/// Decrements the active count however the connection task ends.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle_connection(client: TcpStream, shared: Arc<Shared>, mut cuts: watch::Receiver<u64>) {
    let _guard = ActiveGuard(shared.clone());
    let client_fd = client.as_raw_fd();
    let upstream_fd = AtomicI32::new(-1);
    let forward = async {
        let connected = tokio::time::timeout(
            UPSTREAM_CONNECT_TIMEOUT,
            TcpStream::connect(shared.upstream),
        )
        .await;
        let Ok(Ok(upstream)) = connected else {
            // Upstream unreachable: reset the client, like a dead server.
            reset_on_close(client_fd);
            return;
        };
        upstream_fd.store(upstream.as_raw_fd(), Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (client_read, client_write) = client.into_split();
        let (upstream_read, upstream_write) = upstream.into_split();
        tokio::join!(
            pump(client_read, upstream_write, &shared),
            pump(upstream_read, client_write, &shared),
        );
    };
    let mut forward = std::pin::pin!(forward);
    let cut = tokio::select! {
        _ = &mut forward => false,
        _ = cuts.changed() => true,
    };
    if cut {
        // `forward` still owns both sockets, so the fds are open: make
        // dropping it reset both sides, as a broken link would.
        reset_on_close(client_fd);
        let fd = upstream_fd.load(Ordering::SeqCst);
        if fd >= 0 {
            reset_on_close(fd);
        }
    }
}

/// Sets `SO_LINGER` to 0 on an open socket: closing it sends RST (and never
/// blocks).
fn reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket owned by the caller's future, and
    // `linger` is a valid `struct linger` of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = *shared.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Pass on the half-close; the other direction may still be talking.
    let _ = to.shutdown().await;
}
