//! Operator identities in the control store: written directly (not through the writer
//! task), because the caller needs the outcome (a name taken, a name unknown) at once,
//! and read on every authenticated request, so a revoke on one coordinator holds on
//! every coordinator sharing the store from the next request on.
use sqlx::Row;

use super::{Store, StoreError, now_ms};

/// One operator as stored: never its token, only the token's SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRow {
    pub name: String,
    pub role: String,
    /// The approval matrix's roles it approves in (e.g. `dba`), comma-separated.
    pub approval_roles: String,
    pub created_at_ms: i64,
    pub created_by: String,
    /// 0 while active.
    pub revoked_at_ms: i64,
    /// When the name was given again after a revocation (0: never revoked): a client
    /// certificate of this name valid from before then is refused. Certificates outlive
    /// people; the one of a revoked holder would otherwise act as the new operator, with
    /// the new role.
    pub certificates_from_ms: i64,
}

impl OperatorRow {
    pub fn approval_roles(&self) -> Vec<String> {
        self.approval_roles
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_string)
            .collect()
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms != 0
    }
}

const COLUMNS: &str =
    "name, role, approval_roles, created_at_ms, created_by, revoked_at_ms, certificates_from_ms";

fn operator_row(r: &sqlx::any::AnyRow) -> OperatorRow {
    OperatorRow {
        name: r.get(0),
        role: r.get(1),
        approval_roles: r.get(2),
        created_at_ms: r.get(3),
        created_by: r.get(4),
        revoked_at_ms: r.get(5),
        certificates_from_ms: r.get(6),
    }
}

impl Store {
    /// Adds an operator with its token's hash. A name in use by an active operator is
    /// refused (false); a revoked one's name is taken over, with the new token, and client
    /// certificates of the name valid from before now are no longer its.
    pub async fn add_operator(
        &self,
        row: &OperatorRow,
        token_sha256: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO operators (name, role, approval_roles, token_sha256, created_at_ms, created_by, revoked_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, 0)
             ON CONFLICT (name) DO UPDATE SET role = excluded.role,
                approval_roles = excluded.approval_roles, token_sha256 = excluded.token_sha256,
                created_at_ms = excluded.created_at_ms, created_by = excluded.created_by,
                revoked_at_ms = 0, certificates_from_ms = excluded.created_at_ms
             WHERE operators.revoked_at_ms <> 0",
        )
        .bind(&row.name)
        .bind(&row.role)
        .bind(&row.approval_roles)
        .bind(token_sha256)
        .bind(now_ms())
        .bind(&row.created_by)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Every operator, revoked ones included, by name.
    pub async fn operators(&self) -> Result<Vec<OperatorRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM operators ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(operator_row).collect())
    }

    /// The operator whose token hashes to `token_sha256`, revoked or not.
    pub async fn operator_by_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<OperatorRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM operators WHERE token_sha256 = $1"
        )))
        .bind(token_sha256)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(operator_row))
    }

    /// The operator named `name`, revoked or not.
    pub async fn operator(&self, name: &str) -> Result<Option<OperatorRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM operators WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(operator_row))
    }

    /// Revokes an active operator; false when there is none of that name (or it is
    /// revoked already).
    pub async fn revoke_operator(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE operators SET revoked_at_ms = $1 WHERE name = $2 AND revoked_at_ms = 0",
        )
        .bind(now_ms())
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether the store has ever held an operator (revoked ones count: revoking the last
    /// operator must not turn authentication off).
    pub async fn has_operators(&self) -> Result<bool, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM operators")
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, role: &str) -> OperatorRow {
        OperatorRow {
            name: name.into(),
            role: role.into(),
            approval_roles: "dba,lead".into(),
            created_at_ms: 0,
            created_by: "root".into(),
            revoked_at_ms: 0,
            certificates_from_ms: 0,
        }
    }

    /// SQLite and PostgreSQL alike: a name is taken once; a revoked operator's token no
    /// longer names an active operator, its name can be given a new token, and the store
    /// still says it has operators (authentication stays on).
    #[tokio::test(flavor = "multi_thread")]
    async fn operators_are_added_once_revoked_and_renamed_alike_on_both_stores() {
        let (_dir, _pg, locations) = crate::store::tests::both_stores("operators_store").await;
        for location in locations {
            let store = Store::open(&flotilla_core::secrets::SecretUrl::new(location.clone()))
                .await
                .unwrap();
            assert!(!store.has_operators().await.unwrap(), "{location}");
            assert!(
                store
                    .add_operator(&row("alice", "approver"), "h1")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .add_operator(&row("alice", "admin"), "h2")
                    .await
                    .unwrap(),
                "{location}: a name in use is refused"
            );
            let found = store.operator_by_token("h1").await.unwrap().unwrap();
            assert_eq!(found.role, "approver", "{location}");
            assert_eq!(found.approval_roles(), ["dba", "lead"]);
            assert!(found.created_at_ms > 0 && !found.is_revoked());
            assert_eq!(
                found.certificates_from_ms, 0,
                "never revoked: any certificate"
            );
            assert!(store.operator_by_token("h2").await.unwrap().is_none());

            assert!(store.revoke_operator("alice").await.unwrap());
            assert!(!store.revoke_operator("alice").await.unwrap(), "{location}");
            assert!(!store.revoke_operator("nobody").await.unwrap());
            assert!(
                store
                    .operator_by_token("h1")
                    .await
                    .unwrap()
                    .unwrap()
                    .is_revoked()
            );
            assert!(store.has_operators().await.unwrap(), "{location}: stays on");

            assert!(
                store
                    .add_operator(&row("alice", "viewer"), "h3")
                    .await
                    .unwrap()
            );
            assert!(
                store.operator_by_token("h1").await.unwrap().is_none(),
                "old token gone"
            );
            let again = store.operator("alice").await.unwrap().unwrap();
            assert_eq!((again.role.as_str(), again.is_revoked()), ("viewer", false));
            assert_eq!(
                again.certificates_from_ms, again.created_at_ms,
                "{location}: the name given again takes certificates from then on"
            );
            assert_eq!(store.operators().await.unwrap().len(), 1, "{location}");
        }
    }
}
