//! A real Prometheus server (Debian's `prometheus` package, or `FLOTILLA_PROMETHEUS_BIN`)
//! scraping a tiny exporter the test controls, for the Prometheus gates of waves.
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_testkit::{ManagedProcess, TestDir, free_port, http, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `/metrics` with one gauge, `flotilla_test_error_ratio`, whose value the test sets.
pub struct Exporter {
    pub addr: SocketAddr,
    value: Arc<Mutex<f64>>,
}

impl Exporter {
    pub async fn start(value: f64) -> anyhow::Result<Exporter> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let value = Arc::new(Mutex::new(value));
        let shared = value.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let v = *shared.lock().unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    // the request itself does not matter: there is one page
                    let _ = s.read(&mut buf).await;
                    let body = format!(
                        "# TYPE flotilla_test_error_ratio gauge\nflotilla_test_error_ratio {v}\n"
                    );
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        Ok(Exporter { addr, value })
    }

    pub fn set(&self, v: f64) {
        *self.value.lock().unwrap() = v;
    }
}

pub struct Prometheus {
    _process: ManagedProcess,
    pub addr: SocketAddr,
    _dir: TestDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second and waits until it has a sample.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Prometheus> {
        let bin = std::env::var("FLOTILLA_PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
        if Command::new(&bin).arg("--version").output().is_err() {
            bail!(
                "no `{bin}` binary: install Debian's prometheus package (scripts/test.sh does) \\
                 or set FLOTILLA_PROMETHEUS_BIN"
            );
        }
        let dir = TestDir::new("prometheus")?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: test\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )?;
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"));
        let process = ManagedProcess::spawn(cmd, "prometheus", &dir.join("prometheus.log"))?;
        let prom = Prometheus {
            _process: process,
            addr,
            _dir: dir,
        };
        wait_until(
            "Prometheus has scraped the exporter",
            Duration::from_secs(60),
            async || {
                let r = http::get(addr, "/api/v1/query?query=flotilla_test_error_ratio").await;
                Ok(r.is_ok_and(|r| r.status == 200 && r.body.contains("\"value\"")))
            },
        )
        .await
        .context("waiting for Prometheus")?;
        Ok(prom)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until Prometheus answers the gauge with `v` (after the next scrape).
    pub async fn wait_for_value(&self, v: f64) -> anyhow::Result<()> {
        let addr = self.addr;
        wait_until(
            &format!("Prometheus sees {v}"),
            Duration::from_secs(30),
            async || {
                let r = http::get(addr, "/api/v1/query?query=flotilla_test_error_ratio").await?;
                Ok(r.body.contains(&format!("\"{v}\"")))
            },
        )
        .await
    }
}
