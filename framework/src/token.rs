//! Signed, expiring access tokens shared by the services: JWTs (HS256) naming a user, issued by
//! the service that logs users in and verified by any service holding the same secret.
//!
//! A token says who (`sub`), which session (`sid`, so the issuer can revoke it), who issued it
//! and for whom (`iss`, `aud`), and until when (`exp`). Verification checks the signature, the
//! issuer, the audience and the expiry (no leeway); it never touches a database. Whether the
//! user may still act (not suspended or deleted) is for the verifying service to check against
//! its own data.

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The audience every Ferrybox reference token names.
pub const AUDIENCE: &str = "ferrybox";
/// The shortest secret accepted, in bytes (HS256 wants at least its hash size).
pub const MIN_SECRET_BYTES: usize = 32;

/// What a token carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: Uuid,
    /// The session, for revocation by the issuer.
    pub sid: Uuid,
    /// The issuer.
    pub iss: String,
    /// The audience.
    pub aud: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (seconds since the epoch).
    pub exp: i64,
}

/// Why a token was refused. Deliberately coarse: callers answer 401 either way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Expired.
    #[error("the token has expired")]
    Expired,
    /// Not signed with our key, not for us, or not a token at all.
    #[error("the token is not valid")]
    Invalid,
}

/// Signs and verifies tokens with one shared secret.
#[derive(Clone)]
pub struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey").finish_non_exhaustive()
    }
}

impl TokenKey {
    /// A key from `secret` (at least [`MIN_SECRET_BYTES`] bytes) for the tokens `issuer` (the
    /// service that logs users in) signs: the tokens it issues name it, and it verifies only
    /// tokens that name it.
    pub fn new(secret: &SecretString, issuer: &str) -> crate::Result<Self> {
        let bytes = secret.expose_secret().as_bytes();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(crate::Error::Config(format!(
                "the token secret must be at least {MIN_SECRET_BYTES} bytes"
            )));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 0;
        let unusable =
            |e: jsonwebtoken::errors::Error| crate::Error::Config(format!("token secret: {e}"));
        Ok(Self {
            encoding: EncodingKey::from_secret(bytes).map_err(unusable)?,
            decoding: DecodingKey::from_secret(bytes).map_err(unusable)?,
            validation,
            issuer: issuer.to_owned(),
        })
    }

    /// A key with a random secret: tokens it signs die with the process and no other service
    /// can verify them (for a service started without a configured secret).
    pub fn ephemeral(issuer: &str) -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self::new(&SecretString::from(secret), issuer)
            .expect("64 hex characters are a valid secret")
    }

    /// A token for `user` in session `session`, valid until `expires_at`.
    pub fn issue(
        &self,
        user: Uuid,
        session: Uuid,
        expires_at: DateTime<Utc>,
    ) -> crate::Result<String> {
        let claims = Claims {
            sub: user,
            sid: session,
            iss: self.issuer.clone(),
            aud: AUDIENCE.to_owned(),
            iat: Utc::now().timestamp(),
            exp: expires_at.timestamp(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| crate::Error::Config(format!("signing a token: {e}")))
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(secret: &str) -> TokenKey {
        TokenKey::new(&SecretString::from(secret.to_owned()), "issuer").unwrap()
    }

    #[test]
    fn a_token_verifies_with_its_key_only_and_until_it_expires() {
        let k = key("a-test-secret-of-at-least-32-bytes!!");
        let (user, session) = (Uuid::new_v4(), Uuid::new_v4());
        let token = k
            .issue(user, session, Utc::now() + chrono::Duration::minutes(5))
            .unwrap();
        let claims = k.verify(&token).unwrap();
        assert_eq!((claims.sub, claims.sid), (user, session));
        let other = key("another-secret-of-at-least-32-bytes!");
        assert_eq!(other.verify(&token), Err(TokenError::Invalid));
        let expired = k
            .issue(user, session, Utc::now() - chrono::Duration::seconds(5))
            .unwrap();
        assert_eq!(k.verify(&expired), Err(TokenError::Expired));
        assert_eq!(k.verify("not.a.token"), Err(TokenError::Invalid));
        let mut tampered = token;
        tampered.insert(tampered.len() - 3, 'x');
        assert_eq!(k.verify(&tampered), Err(TokenError::Invalid));
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert!(TokenKey::new(&SecretString::from("short".to_owned()), "issuer").is_err());
        assert!(TokenKey::ephemeral("issuer").verify("x").is_err());
    }

    #[test]
    fn a_token_of_another_issuer_is_refused() {
        let secret = SecretString::from("a-test-secret-of-at-least-32-bytes!!".to_owned());
        let ours = TokenKey::new(&secret, "auth-service").unwrap();
        let theirs = TokenKey::new(&secret, "someone-else").unwrap();
        let token = theirs
            .issue(
                Uuid::new_v4(),
                Uuid::new_v4(),
                Utc::now() + chrono::Duration::minutes(5),
            )
            .unwrap();
        assert_eq!(ours.verify(&token), Err(TokenError::Invalid));
        assert_eq!(theirs.verify(&token).unwrap().iss, "someone-else");
    }
}
