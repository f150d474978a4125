//! A throwaway single-member etcd on free loopback ports below 32768, with a temp data dir.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Etcd {
    child: Child,
    dir: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

/// The etcd binary: `$FLOTILLA_ETCD_BIN`, else `/usr/bin/etcd`, `/usr/local/bin/etcd`.
fn binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("FLOTILLA_ETCD_BIN").filter(|b| !b.is_empty()) {
        return Some(bin.into());
    }
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    for _ in 0..10_000 {
        let port = 15000 + rand::random::<u16>() % 17000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 15000..32000");
}

/// Whether etcd at `port` answers `/health` with `{"health":"true"}`.
async fn healthy(port: u16) -> bool {
    let ask = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let req = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        Some(String::from_utf8_lossy(&raw).contains(r#""health":"true""#))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ask).await,
        Ok(Some(true))
    )
}

fn spawn(bin: &Path, dir: &Path, client: u16, peer: u16) -> std::io::Result<Child> {
    let log = std::fs::File::create(dir.join("etcd.log"))?;
    let (c, p) = (
        format!("http://127.0.0.1:{client}"),
        format!("http://127.0.0.1:{peer}"),
    );
    let mut cmd = Command::new(bin);
    cmd.args(["--name", "agent-test", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
        ])
        .args(["--initial-cluster", &format!("agent-test={p}")])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(key);
        }
    }
    cmd.spawn()
}

/// A healthy etcd, or None (with a note) when there is no etcd binary.
pub async fn start() -> Option<Etcd> {
    let Some(bin) = binary() else {
        println!("no etcd binary (FLOTILLA_ETCD_BIN, /usr/bin/etcd): skipping the etcd test");
        return None;
    };
    for attempt in 1..=3 {
        let dir = std::env::temp_dir().join(format!(
            "flotilla-agent-etcd-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("etcd temp dir");
        let client = free_port();
        let peer = free_port();
        let child = spawn(&bin, &dir, client, peer).expect("spawn etcd");
        let mut etcd = Etcd {
            child,
            dir,
            endpoint: format!("http://127.0.0.1:{client}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if healthy(client).await {
                return Some(etcd);
            }
            if etcd.child.try_wait().ok().flatten().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!("etcd did not become healthy (attempt {attempt}):");
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
    }
    panic!("etcd did not start");
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
