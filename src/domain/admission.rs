//! Admission rules for a new request, decided from projected facts about the
//! user (so the limits survive restarts) and the time passed in.

use chrono::{DateTime, Utc};

/// `N` accepted requests per user per `window_secs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub window_secs: u64,
}

/// The per-user limits of §3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub rate: RateLimit,
    pub max_pending: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rate: RateLimit {
                count: 5,
                window_secs: 60,
            },
            max_pending: 3,
        }
    }
}

/// The longest rate window the projections can answer for: acceptance
/// times older than this are forgotten.
pub const MAX_RATE_WINDOW_SECS: u64 = 24 * 60 * 60;
/// The most acceptance times kept per user, so one user cannot grow memory.
pub const MAX_RECENT_PER_USER: usize = 256;

/// Why a new request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("rate limit reached; try again in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("already {pending} requests pending (limit {max})")]
    TooManyPending { pending: u32, max: u32 },
}

/// Decides whether a user with `pending` unfinished requests and the given
/// acceptance times (oldest first) may have one more at `now`.
///
/// # Errors
/// A [`Rejection`] naming the limit and, for the rate, when to retry.
pub fn admit(
    pending: u32,
    recent: &[DateTime<Utc>],
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<(), Rejection> {
    if pending >= limits.max_pending {
        return Err(Rejection::TooManyPending {
            pending,
            max: limits.max_pending,
        });
    }
    let window = chrono::Duration::seconds(
        i64::try_from(limits.rate.window_secs).unwrap_or(i64::MAX / 2_000),
    );
    let since = now - window;
    let in_window: Vec<&DateTime<Utc>> = recent.iter().filter(|t| **t > since).collect();
    if in_window.len() >= limits.rate.count as usize {
        // The user may try again when the oldest acceptance that still
        // counts leaves the window.
        let idx = in_window.len() - limits.rate.count as usize;
        let frees_at = *in_window[idx] + window;
        let wait = (frees_at - now).num_milliseconds().max(0);
        let secs = u64::try_from((wait + 999) / 1000).unwrap_or(0).max(1);
        return Err(Rejection::RateLimited {
            retry_after_secs: secs,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).single().unwrap()
    }

    #[test]
    fn pending_cap_comes_first() {
        let limits = Limits::default();
        assert_eq!(
            admit(3, &[], &limits, t(0)),
            Err(Rejection::TooManyPending { pending: 3, max: 3 })
        );
        assert_eq!(admit(2, &[], &limits, t(0)), Ok(()));
    }

    #[test]
    fn rate_limit_says_when_to_retry() {
        let limits = Limits {
            rate: RateLimit {
                count: 2,
                window_secs: 60,
            },
            max_pending: 10,
        };
        let recent = [t(0), t(10)];
        assert_eq!(
            admit(0, &recent, &limits, t(20)),
            Err(Rejection::RateLimited {
                retry_after_secs: 40
            })
        );
        assert_eq!(admit(0, &recent, &limits, t(60)), Ok(()));
    }
}
