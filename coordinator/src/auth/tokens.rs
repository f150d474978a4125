//! Bearer tokens: 32 random bytes, written `flotilla_<64 hex>`. The store keeps only the
//! token's SHA-256. A plain, unsalted hash is enough here, unlike for passwords: a token
//! carries 256 bits from a CSPRNG, so no dictionary or brute force reaches it through
//! its hash, and a slow KDF would buy nothing but latency on every request. Being
//! deterministic, the hash is also the lookup key (one indexed read per request, no
//! comparison loop whose timing could leak anything).
use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};

const PREFIX: &str = "flotilla_";
const RANDOM_BYTES: usize = 32;

/// A bearer token. Never printed by `Debug` or `Display` (DESIGN invariant 8): only
/// [`Token::reveal`] gives it out, once, to the operator it was made for.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the bearer token is malformed (expected `flotilla_` and 64 hex digits)")]
    Malformed,
}

impl Token {
    /// A new token from the thread's CSPRNG (ChaCha, seeded and reseeded from the OS).
    pub fn generate() -> Token {
        let mut bytes = [0u8; RANDOM_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Token(format!("{PREFIX}{}", hex::encode(bytes)))
    }

    /// Checks a presented token's shape (the cheap refusal before any store read).
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        let hex_part = s.trim().strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        if hex_part.len() == RANDOM_BYTES * 2
            && hex_part
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            Ok(Token(s.trim().to_string()))
        } else {
            Err(TokenError::Malformed)
        }
    }

    /// The token itself: only to hand it to its operator once, or to send it.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    /// What the store keeps and looks up.
    pub fn sha256(&self) -> String {
        hash_token(&self.0)
    }
}

/// SHA-256 of a token, hex.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_well_formed_and_never_printed() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a, b);
        assert_eq!(Token::parse(a.reveal()), Ok(a.clone()));
        assert_eq!(a.reveal().len(), PREFIX.len() + 64);
        assert_eq!(format!("{a:?} {a}"), "Token(***) ***");
        assert_eq!(a.sha256().len(), 64);
        assert_ne!(a.sha256(), b.sha256());
        assert_eq!(a.sha256(), hash_token(a.reveal()));
        for bad in [
            "",
            "secret",
            "flotilla_",
            "flotilla_xyz",
            &a.reveal()[..a.reveal().len() - 1],
            &a.reveal().to_uppercase(),
        ] {
            assert_eq!(Token::parse(bad), Err(TokenError::Malformed), "{bad}");
        }
    }
}
