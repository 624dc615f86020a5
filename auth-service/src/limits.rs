//! Login rate limits, per account and per client address: guessing passwords costs an attacker
//! time whether they try many passwords on one account or one password on many accounts.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

/// How many login attempts are allowed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoginLimits {
    /// Attempts per minute for one account (email), whatever the address.
    pub per_account_per_minute: u32,
    /// Attempts per minute from one client address, whatever the account.
    pub per_address_per_minute: u32,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            per_account_per_minute: 10,
            per_address_per_minute: 60,
        }
    }
}

impl LoginLimits {
    /// Checks both limits are at least 1.
    pub fn validate(&self) -> ferrybox::Result<()> {
        if self.per_account_per_minute == 0 || self.per_address_per_minute == 0 {
            return Err(ferrybox::Error::Config(
                "login_limits: each limit must be at least 1 a minute".into(),
            ));
        }
        Ok(())
    }
}

/// The limiters, shared by every request.
pub struct LoginLimiter {
    account: DefaultKeyedRateLimiter<String>,
    address: DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicU64,
}

impl std::fmt::Debug for LoginLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginLimiter").finish_non_exhaustive()
    }
}

/// Forget idle keys every this many checks, so the limiters' memory stays bounded.
const RETAIN_EVERY: u64 = 1_024;

impl LoginLimiter {
    /// Limiters for `limits`.
    pub fn new(limits: LoginLimits) -> Self {
        let quota = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        Self {
            account: RateLimiter::keyed(quota(limits.per_account_per_minute)),
            address: RateLimiter::keyed(quota(limits.per_address_per_minute)),
            checks: AtomicU64::new(0),
        }
    }

    /// Counts one attempt for `email` from `address`; `Err(wait)` when either limit is spent.
    pub fn check(&self, email: &str, address: IpAddr) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.account.retain_recent();
            self.address.retain_recent();
        }
        let now = DefaultClock::default().now();
        self.address
            .check_key(&address)
            .map_err(|not_until| not_until.wait_time_from(now))?;
        self.account
            .check_key(&email.trim().to_lowercase())
            .map_err(|not_until| not_until.wait_time_from(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_account_and_each_address_has_its_own_budget() {
        let limiter = LoginLimiter::new(LoginLimits {
            per_account_per_minute: 2,
            per_address_per_minute: 3,
        });
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(limiter.check("ada@example.com", a).is_ok());
        assert!(limiter.check("ADA@example.com ", b).is_ok());
        let wait = limiter.check("ada@example.com", b).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        // Address a has one attempt left, on another account.
        assert!(limiter.check("bob@example.com", a).is_ok());
        assert!(limiter.check("cyd@example.com", a).is_ok());
        assert!(
            limiter.check("dan@example.com", a).is_err(),
            "a's budget is spent"
        );
    }
}
