//! Operators: adding, listing and revoking them (admin), and authenticating a request:
//! the credential it carries, the operator it names, and whether that operator's role
//! allows the method. Refusals are audited with who (when known), what and from where.
use std::sync::atomic::Ordering;

use flotilla_core::pb;
use tracing::{info, warn};

use super::{Role, Token, TokenError, required_role, validate_operator_name};
use crate::error::CoordinatorError;
use crate::service::Coordinator;
use crate::store::{Audit, OperatorRow, Store, StoreOp};

/// When operators must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Once the store holds an operator (the first `flotilla operator add`); before
    /// that, every request is let through and the coordinator says so at start.
    #[default]
    Auto,
    /// Always: with no operator yet, every operator request is refused until the first
    /// admin is added to the store (`flotilla operator add NAME --role admin --store ...`).
    Required,
}

/// What a call's client certificate says of who calls (mTLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSubject {
    /// No certificate, or one without a common name.
    None,
    /// A certificate's common name: the operator of that name; and when it is valid from
    /// (seconds since the epoch), for a name given again after a revocation.
    Operator { name: String, valid_from_s: i64 },
    /// An agent's certificate (it names a shard), described for the refusal: it names
    /// no operator, and is refused on the operator API (with authentication off too).
    Agent(String),
}

/// Who is asking, authenticated: put beside the request by the auth layer, read by the
/// handlers (the identity wins over the request's free-text `actor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    /// The approval matrix's roles this operator approves in (e.g. `dba`).
    pub approval_roles: Vec<String>,
}

/// Refusals recently written to the audit trail, so a flood of the same one from one host
/// is written once per window (the metric still counts each).
#[derive(Debug, Default)]
pub struct RecentRefusals {
    seen: std::sync::Mutex<
        std::collections::HashMap<String, (std::time::Instant, std::time::Duration)>,
    >,
}

impl RecentRefusals {
    /// An operator's refused request: people retry by hand, each try worth a row.
    pub const OPERATOR_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
    /// A refused certificate (in the handshake, or an agent's for another shard): machines
    /// retry every few seconds for as long as nobody fixes them, so the same refusal from
    /// the same host is written once in five minutes.
    pub const CERTIFICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);
    /// More distinct refusals than this in one window: the oldest are forgotten early.
    const MAX: usize = 4096;

    /// Whether `key` was not seen within the operators' window (and remembers it now).
    pub fn first_in_window(&self, key: String) -> bool {
        self.first_within(key, Self::OPERATOR_WINDOW)
    }

    /// Whether `key` was not seen within `window` (and remembers it now).
    pub fn first_within(&self, key: String, window: std::time::Duration) -> bool {
        let now = std::time::Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= Self::MAX {
            seen.retain(|_, (at, window)| now.duration_since(*at) < *window);
            if seen.len() >= Self::MAX {
                seen.clear();
            }
        }
        match seen.get(&key) {
            Some((at, _)) if now.duration_since(*at) < window => false,
            _ => {
                seen.insert(key, (now, window));
                true
            }
        }
    }
}

/// A new operator and its token (shown once).
#[derive(Debug)]
pub struct AddedOperator {
    pub operator: OperatorRow,
    pub token: Token,
}

impl AddedOperator {
    pub fn to_pb(&self) -> pb::AddOperatorResponse {
        pb::AddOperatorResponse {
            operator: Some(operator_info(&self.operator)),
            token: self.token.reveal().to_string(),
        }
    }
}

pub fn operator_info(row: &OperatorRow) -> pb::OperatorInfo {
    pb::OperatorInfo {
        name: row.name.clone(),
        role: row.role.clone(),
        approval_roles: row.approval_roles(),
        created_at_ms: row.created_at_ms as u64,
        created_by: row.created_by.clone(),
        revoked_at_ms: row.revoked_at_ms as u64,
        certificates_from_ms: row.certificates_from_ms as u64,
    }
}

/// Adds an operator to `store` with a new token, audited as done by `by`. Used by the
/// `AddOperator` RPC and, with no coordinator, by the bootstrap
/// (`flotilla operator add NAME --role admin --store URL`).
pub async fn add_operator(
    store: &Store,
    name: &str,
    role: &str,
    approval_roles: &[String],
    by: &str,
) -> Result<AddedOperator, CoordinatorError> {
    let name = name.trim();
    validate_operator_name(name).map_err(CoordinatorError::InvalidRequest)?;
    let role: Role = role.parse().map_err(CoordinatorError::InvalidRequest)?;
    let mut roles: Vec<String> = Vec::new();
    for r in approval_roles
        .iter()
        .flat_map(|r| r.split(','))
        .map(str::trim)
    {
        if r.is_empty() {
            continue;
        }
        if !r
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        {
            return Err(CoordinatorError::InvalidRequest(format!(
                "approval role `{r}` of operator `{name}`: letters, digits, `-` and `_` only"
            )));
        }
        if !roles.iter().any(|x| x == r) {
            roles.push(r.to_string());
        }
    }
    if !roles.is_empty() && !role.grants(Role::Approver) {
        return Err(CoordinatorError::InvalidRequest(format!(
            "operator `{name}` has role {role}, which cannot approve: approval roles ({}) need role approver or admin",
            roles.join(", ")
        )));
    }
    let token = Token::generate();
    let row = OperatorRow {
        name: name.to_string(),
        role: role.as_str().to_string(),
        approval_roles: roles.join(","),
        created_at_ms: 0,
        created_by: by.to_string(),
        revoked_at_ms: 0,
        certificates_from_ms: 0,
    };
    if !store.add_operator(&row, &token.sha256()).await? {
        return Err(CoordinatorError::OperatorExists(name.to_string()));
    }
    let operator = store
        .operator(name)
        .await?
        .ok_or_else(|| CoordinatorError::OperatorNotFound(name.to_string()))?;
    let mut detail = match roles.is_empty() {
        true => format!("operator {name} as {role}"),
        false => format!(
            "operator {name} as {role} (approves as {})",
            roles.join(", ")
        ),
    };
    if operator.certificates_from_ms > 0 {
        detail.push_str(
            "; the name of a revoked operator given again: client certificates of this name \
             valid from before now are refused",
        );
    }
    store
        .apply(vec![StoreOp::Audit(Audit {
            actor: by.to_string(),
            action: "operator-add",
            plan_id: String::new(),
            detail,
        })])
        .await?;
    info!(operator = name, %role, by, again = operator.certificates_from_ms > 0, "operator added");
    Ok(AddedOperator { operator, token })
}

/// Revokes an operator in `store`, audited as done by `by`.
pub async fn revoke_operator(
    store: &Store,
    name: &str,
    by: &str,
) -> Result<OperatorRow, CoordinatorError> {
    let name = name.trim();
    if !store.revoke_operator(name).await? {
        return Err(CoordinatorError::OperatorNotFound(name.to_string()));
    }
    store
        .apply(vec![StoreOp::Audit(Audit {
            actor: by.to_string(),
            action: "operator-revoke",
            plan_id: String::new(),
            detail: format!("operator {name}"),
        })])
        .await?;
    warn!(operator = name, by, "operator revoked");
    store
        .operator(name)
        .await?
        .ok_or_else(|| CoordinatorError::OperatorNotFound(name.to_string()))
}

/// How long a request waits for the store to say whether operators exist.
const AUTH_READ_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

impl Coordinator {
    /// Whether operators must authenticate now. Once the store has held an operator it
    /// stays on (revoked rows are kept), so the answer is remembered.
    pub async fn auth_on(&self) -> Result<bool, CoordinatorError> {
        self.auth_on_for(false).await
    }

    /// [`Coordinator::auth_on`] for a request that only reads (`reading`): while the store
    /// does not answer, a read goes on as the store last said (authentication off), so the
    /// leader still tells a running plan's status during the store's outage. Anything that
    /// changes something is refused meanwhile (the first admin may have been added straight
    /// into the store since, `operator add --store`): no write is let through unchecked.
    async fn auth_on_for(&self, reading: bool) -> Result<bool, CoordinatorError> {
        if self.inner.auth == AuthMode::Required || self.inner.auth_seen.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let asked = tokio::time::timeout(AUTH_READ_WITHIN, self.inner.store.has_operators()).await;
        let on = match asked {
            Ok(Ok(on)) => on,
            // The store away, a read, and no operator when it last answered.
            _ if reading && self.inner.auth_off_seen.load(Ordering::Relaxed) => {
                // (the store's outage is logged once, by its probe; this is every read's)
                tracing::debug!(
                    "the control store does not answer: a read goes on as it last said (no operators); requests that change anything are refused until it answers"
                );
                return Ok(false);
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(CoordinatorError::Store(
                    crate::store::StoreError::Unreachable(format!(
                        "no answer within {AUTH_READ_WITHIN:?} to whether operators exist"
                    )),
                ));
            }
        };
        if !on {
            self.inner.auth_off_seen.store(true, Ordering::Relaxed);
        }
        if on {
            self.inner.auth_seen.store(true, Ordering::Relaxed);
            info!("operators exist in the control store: operator requests now authenticate");
        }
        Ok(on)
    }

    /// Authenticates a call of `OperatorService/<method>` from `peer` carrying `bearer`
    /// (the `authorization` metadata, if any): the caller, or None while authentication
    /// is off; Unauthenticated without a valid credential, NotAllowed with the wrong
    /// role. Every refusal is written to the audit trail.
    ///
    /// `certificate` is the seam for client certificates (mTLS): the common name of a
    /// verified client certificate names the operator (its role from the store), when no
    /// bearer token is given; an agent's certificate names none.
    pub async fn authenticate(
        &self,
        method: &str,
        bearer: Option<&str>,
        certificate: &CertSubject,
        peer: &str,
        plan_id: &str,
    ) -> Result<Option<Caller>, CoordinatorError> {
        let needed = required_role(method);
        let auth_on = self.auth_on_for(needed == Role::Viewer).await?;
        // An agent's certificate is an agent's, not an operator's, whether or not operators
        // authenticate: with none in the store yet, every certificate of the CA got the whole
        // operator API (lock breaks, submits), a shard's host or whoever took its key
        // included. A token still wins once operators exist (it names one); before, it names
        // nobody, so it cannot lift the refusal.
        if let CertSubject::Agent(whose) = certificate
            && (bearer.is_none() || !auth_on)
        {
            return Err(self
                .refuse_agent_certificate(whose, method, peer, plan_id)
                .await);
        }
        if !auth_on {
            return Ok(None);
        }
        let found = match (bearer, certificate) {
            (Some(header), _) => match bearer_token(header) {
                Ok(token) => self.inner.store.operator_by_token(&token.sha256()).await?,
                Err(e) => {
                    return Err(self
                        .refuse_unauthenticated(method, peer, e.to_string())
                        .await);
                }
            },
            (
                None,
                CertSubject::Operator {
                    name: subject,
                    valid_from_s,
                },
            ) => {
                let found = self.inner.store.operator(subject).await?;
                // Valid from before the name was given again (after a revocation): the
                // former holder's. Compared in whole seconds, as certificates say.
                if let Some(op) = &found
                    && !op.is_revoked()
                    && *valid_from_s < op.certificates_from_ms / 1000
                {
                    let why = format!(
                        "the client certificate of {subject} is valid from {}, before the name was \
                         given again after its revocation ({}): it was the revoked operator's; \
                         issue the operator a new certificate",
                        rfc3339_s(*valid_from_s * 1000),
                        rfc3339_s(op.certificates_from_ms)
                    );
                    return Err(self.refuse_unauthenticated(method, peer, why).await);
                }
                found
            }
            (None, CertSubject::Agent(whose)) => {
                return Err(self
                    .refuse_agent_certificate(whose, method, peer, plan_id)
                    .await);
            }
            (None, CertSubject::None) => {
                return Err(self
                    .refuse_unauthenticated(
                        method,
                        peer,
                        "no credential (give --token-file or FLOTILLA_TOKEN_FILE)".into(),
                    )
                    .await);
            }
        };
        let operator = match found {
            Some(op) if !op.is_revoked() => op,
            Some(op) => {
                let why = format!("the credential of operator {} was revoked", op.name);
                return Err(self.refuse_unauthenticated(method, peer, why).await);
            }
            None => {
                let why = "the credential names no operator".to_string();
                return Err(self.refuse_unauthenticated(method, peer, why).await);
            }
        };
        let role: Role = operator.role.parse().map_err(|e: String| {
            CoordinatorError::InvalidRequest(format!("operator {}: {e}", operator.name))
        })?;
        if !role.grants(needed) {
            let why = format!(
                "operator {} has role {role}; {method} needs {needed}",
                operator.name
            );
            self.audit_refusal(&operator.name, "denied", method, peer, plan_id, &why)
                .await;
            return Err(CoordinatorError::NotAllowed(why));
        }
        Ok(Some(Caller {
            approval_roles: operator.approval_roles(),
            name: operator.name,
            role,
        }))
    }

    /// A call made with an agent's client certificate (`whose` describes it): the agent is
    /// known (its certificate was verified) and not allowed the operator API, so the
    /// refusal is PERMISSION_DENIED, audited as `denied` by `agent`, under the plan named.
    async fn refuse_agent_certificate(
        &self,
        whose: &str,
        method: &str,
        peer: &str,
        plan_id: &str,
    ) -> CoordinatorError {
        let why = format!(
            "the client certificate is an agent's ({whose}): it names no operator, and an \
             agent's certificate may not call the operator API (give an operator's certificate \
             or token)"
        );
        self.audit_refusal("agent", "denied", method, peer, plan_id, &why)
            .await;
        CoordinatorError::NotAllowed(why)
    }

    /// Audited under no plan: who sent it is not known, so the plan it names is not theirs to
    /// file a row under, nor a key that makes each request a new one to write (a flood).
    async fn refuse_unauthenticated(
        &self,
        method: &str,
        peer: &str,
        why: String,
    ) -> CoordinatorError {
        self.audit_refusal("anonymous", "unauthenticated", method, peer, "", &why)
            .await;
        CoordinatorError::Unauthenticated(why)
    }

    /// A refused request in the audit trail: who (when known), what, from where, why.
    /// Skipping the promotion gate is an admin's override: with authentication on, any
    /// other role is refused (and audited); with it off, `--as` names whoever asks.
    pub async fn skip_promotion_allowed(
        &self,
        caller: Option<&Caller>,
        peer: &str,
    ) -> Result<(), CoordinatorError> {
        self.admin_override(caller, peer, "", "SubmitPlan", "--skip-promotion-check")
            .await
    }

    /// Replacing an ended plan's down SQL (`plan rollback --down-from`) runs SQL that no
    /// approval rule saw on every target: an admin's override, as skipping the promotion
    /// gate is (an operator may roll back with the stored down SQL).
    pub async fn replace_down_allowed(
        &self,
        caller: Option<&Caller>,
        peer: &str,
        plan_id: &str,
    ) -> Result<(), CoordinatorError> {
        let what = "--down-from (down SQL no approval saw, run on every target)";
        self.admin_override(caller, peer, plan_id, "RollbackPlan", what)
            .await
    }

    /// An option of `method` only an admin may use: any other role is refused (and
    /// audited) with authentication on; with it off, `--as` names whoever asks.
    async fn admin_override(
        &self,
        caller: Option<&Caller>,
        peer: &str,
        plan_id: &str,
        method: &str,
        what: &str,
    ) -> Result<(), CoordinatorError> {
        match caller {
            Some(c) if !c.role.grants(Role::Admin) => {
                let why = format!(
                    "{} has role {}: {what} needs admin",
                    c.name,
                    c.role.as_str()
                );
                self.audit_refusal(&c.name, "denied", method, peer, plan_id, &why)
                    .await;
                Err(CoordinatorError::NotAllowed(why))
            }
            _ => Ok(()),
        }
    }

    async fn audit_refusal(
        &self,
        who: &str,
        action: &'static str,
        method: &str,
        peer: &str,
        plan_id: &str,
        why: &str,
    ) {
        crate::metrics::auth_refusal(action);
        // The same refusal from the same host again within the window is counted, not
        // written: anyone who reaches the port can send refused requests, and they must
        // not be able to fill the control store (or the log) with them.
        let host = peer.rsplit_once(':').map_or(peer, |(host, _)| host);
        let key = format!("{host} {who} {action} {method} {plan_id} {why}");
        if !self.inner.refusals_seen.first_in_window(key) {
            return;
        }
        warn!(
            operator = who,
            method, peer, "operator request refused: {why}"
        );
        self.write_unfenced(StoreOp::Audit(Audit {
            actor: who.to_string(),
            action,
            plan_id: plan_id.to_string(),
            detail: format!("OperatorService/{method} from {peer}: {why}"),
        }));
        // In the store before the refusal is answered: whoever is refused and looks at
        // the audit trail next finds it there.
        self.flush().await;
    }

    /// Who acts: the authenticated operator when there is one (a different `--as` is
    /// refused, audited), else the request's own `actor` (authentication off).
    pub async fn acting(
        &self,
        caller: Option<&Caller>,
        said: &str,
        method: &str,
        peer: &str,
        plan_id: &str,
    ) -> Result<String, CoordinatorError> {
        let said = said.trim();
        match caller {
            // (a CLI with a client certificate leaves its default name out, for the
            // coordinator to take the certificate's; with authentication off nobody does)
            None if said.is_empty() => Ok("unnamed (no --as)".to_string()),
            None => Ok(said.to_string()),
            Some(c) if said.is_empty() || said == c.name => Ok(c.name.clone()),
            Some(c) => {
                let why = format!(
                    "authenticated as {}; cannot act as `{said}` (drop --as: the credential names who acts)",
                    c.name
                );
                self.audit_refusal(&c.name, "denied", method, peer, plan_id, &why)
                    .await;
                Err(CoordinatorError::NotAllowed(why))
            }
        }
    }

    /// The approval matrix roles an approval may be given in: with authentication on,
    /// the credential's (`--role`, if given, must be one of them: refused and audited
    /// otherwise); with it off, the request's `--role`.
    pub async fn approving_roles(
        &self,
        caller: Option<&Caller>,
        asked: &str,
        peer: &str,
        plan_id: &str,
    ) -> Result<Vec<String>, CoordinatorError> {
        let asked = asked.trim();
        let Some(c) = caller else {
            return Ok(vec![asked.to_string()]);
        };
        if asked.is_empty() {
            return Ok(c.approval_roles.clone());
        }
        if c.approval_roles.iter().any(|r| r == asked) {
            return Ok(vec![asked.to_string()]);
        }
        let has = match c.approval_roles.is_empty() {
            true => "none".to_string(),
            false => c.approval_roles.join(", "),
        };
        let why = format!(
            "operator {} cannot approve as `{asked}`: its approval roles are {has} (`flotilla operator add NAME --approval-role ROLE` gives them)",
            c.name
        );
        self.audit_refusal(&c.name, "denied", "ApprovePlan", peer, plan_id, &why)
            .await;
        Err(CoordinatorError::NotAllowed(why))
    }

    pub async fn add_operator(
        &self,
        by: &str,
        r: pb::AddOperatorRequest,
    ) -> Result<pb::AddOperatorResponse, CoordinatorError> {
        if !self.auth_on().await? {
            // Over the network with authentication off, anyone reaching the port could
            // make themselves the first admin and lock everyone else out.
            return Err(CoordinatorError::NotAllowed(
                "no operator exists yet: create the first admin on a host that can write the control store, with `flotilla operator add NAME --role admin --store URL`".into(),
            ));
        }
        let added =
            add_operator(&self.inner.store, &r.name, &r.role, &r.approval_roles, by).await?;
        Ok(added.to_pb())
    }

    pub async fn list_operators(&self) -> Result<pb::ListOperatorsResponse, CoordinatorError> {
        let rows = self.inner.store.operators().await?;
        Ok(pb::ListOperatorsResponse {
            operators: rows.iter().map(operator_info).collect(),
        })
    }

    pub async fn revoke_operator(
        &self,
        by: &str,
        name: &str,
    ) -> Result<pb::OperatorInfo, CoordinatorError> {
        let row = revoke_operator(&self.inner.store, name, by).await?;
        Ok(operator_info(&row))
    }
}

/// The token of an `authorization: Bearer <token>` value.
fn bearer_token(header: &str) -> Result<Token, TokenError> {
    let (scheme, token) = header.trim().split_once(' ').ok_or(TokenError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Malformed);
    }
    Token::parse(token)
}

/// A time in milliseconds since the epoch, as RFC 3339 in whole seconds (UTC).
fn rfc3339_s(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::RecentRefusals;

    #[test]
    fn the_same_refusal_is_written_once_per_window() {
        let r = RecentRefusals::default();
        assert!(
            r.first_in_window("127.0.0.1 anonymous unauthenticated GetPlan no credential".into())
        );
        assert!(
            !r.first_in_window("127.0.0.1 anonymous unauthenticated GetPlan no credential".into())
        );
        assert!(
            r.first_in_window("127.0.0.1 anonymous unauthenticated ListPlans no credential".into())
        );
        assert!(
            r.first_in_window("10.0.0.9 anonymous unauthenticated GetPlan no credential".into())
        );
    }
}
