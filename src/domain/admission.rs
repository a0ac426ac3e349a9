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
    admit_weighted(pending, recent, limits, now, 1)
}

/// [`admit`] for a request that counts `weight` toward the rate limit (a
/// request for N variations counts N, §8). A weight above the limit's
/// count can never pass; intake keeps N within it.
///
/// # Errors
/// As [`admit`].
pub fn admit_weighted(
    pending: u32,
    recent: &[DateTime<Utc>],
    limits: &Limits,
    now: DateTime<Utc>,
    weight: u32,
) -> Result<(), Rejection> {
    let weight = weight.max(1) as usize;
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
    let count = limits.rate.count as usize;
    if in_window.len() + weight > count {
        // The user may try again when enough of the oldest acceptances that
        // still count have left the window to make room for `weight` (a
        // weight above the count never fits: a whole window is said).
        let leave = in_window.len() + weight - count;
        let frees_at = in_window
            .get(leave - 1)
            .map_or(now + window, |t| **t + window);
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
    fn a_request_for_n_images_counts_n() {
        let limits = Limits {
            rate: RateLimit {
                count: 5,
                window_secs: 60,
            },
            max_pending: 10,
        };
        let recent = [t(0), t(10), t(20)];
        assert_eq!(admit_weighted(0, &recent, &limits, t(30), 2), Ok(()));
        // 3 + 3 > 5: one acceptance must leave first, the one at t(0).
        assert_eq!(
            admit_weighted(0, &recent, &limits, t(30), 3),
            Err(Rejection::RateLimited {
                retry_after_secs: 30
            })
        );
        // Two must leave: t(0) and t(10).
        assert_eq!(
            admit_weighted(0, &recent, &limits, t(30), 4),
            Err(Rejection::RateLimited {
                retry_after_secs: 40
            })
        );
        // More than the limit itself never fits: a whole window.
        assert_eq!(
            admit_weighted(0, &[], &limits, t(30), 6),
            Err(Rejection::RateLimited {
                retry_after_secs: 60
            })
        );
        assert_eq!(admit_weighted(0, &[], &limits, t(30), 5), Ok(()));
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
