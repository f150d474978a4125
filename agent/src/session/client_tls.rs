//! The agent's TLS toward coordinators, read again from its files (`--tls-cert`, `--tls-key`,
//! `--tls-ca`) at each reload request (SIGHUP), as the coordinator reads its own: a renewed
//! certificate without a restart. The stream open keeps the connection it has (its
//! certificate was checked at its handshake); the next connection presents the new one.
//! Files that would not do (unreadable, a key of another certificate, expired, naming
//! another shard) change nothing, and are said, naming the file and what is wrong.
use std::sync::{Arc, RwLock};

use flotilla_core::reload::ReloadRequests;
use flotilla_core::tls::TlsFiles;
use tokio_util::sync::CancellationToken;
use tonic::transport::ClientTlsConfig;
use tracing::{error, info};

/// What the next connection to a coordinator is made with.
#[derive(Clone)]
pub(crate) struct ClientTls {
    shard: String,
    files: TlsFiles,
    current: Arc<RwLock<Option<ClientTlsConfig>>>,
}

impl ClientTls {
    pub fn new(shard: &str, files: TlsFiles, given: Option<ClientTlsConfig>) -> ClientTls {
        ClientTls {
            shard: shard.to_string(),
            files,
            current: Arc::new(RwLock::new(given)),
        }
    }

    /// The configuration of the last (re)load.
    pub fn current(&self) -> Option<ClientTlsConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the files again; the new certificate's subject (None: no certificate, a CA
    /// alone), or why nothing changed.
    pub fn reload(&self) -> Result<Option<String>, String> {
        let identity = self.files.identity_pem().map_err(|e| e.to_string())?;
        let subject = match &identity {
            Some(identity) => {
                if let Some(problem) =
                    flotilla_core::tls::agent_certificate_problem(&identity.cert, &self.shard)
                {
                    return Err(problem);
                }
                // (said, not refused, at start: the coordinator refuses it, and audits that;
                // a reload keeps the certificate that works instead)
                if let Some(problem) = self.files.client_certificate_warning() {
                    return Err(problem);
                }
                Some(flotilla_core::tls::certificate_subject(&identity.cert))
            }
            None => None,
        };
        let config = self.files.client_config().map_err(|e| e.to_string())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(subject)
    }

    /// Reloads at each of `reloads` until `stop`; without files there is nothing to read
    /// (the request is said, so that a SIGHUP is seen to have been taken).
    pub async fn follow(self, mut reloads: ReloadRequests, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = reloads.next() => {}
                () = stop.cancelled() => return,
            }
            if self.files.is_empty() {
                info!("reload requested: no TLS files to read again (plaintext)");
                continue;
            }
            match self.reload() {
                Ok(subject) => info!(
                    certificate = subject.as_deref().unwrap_or("none"),
                    "TLS files reloaded: the next connection to a coordinator uses them"
                ),
                Err(why) => error!(
                    "reloading the TLS files failed, nothing changed (the next connection uses the files read before): {why}"
                ),
            }
        }
    }
}
