//! Rate limits: a token bucket per key for the device routes that cost the server work (check-in,
//! upload), so that one client cannot take the server's time from the others. A request over its
//! key's rate gets `429 rate_limited` with the time until a token is back. Two keys are used: the
//! client's IP address (`--rate-limit-per-address`; many phones share one address behind a
//! carrier's NAT, so it is off unless set and meant to be generous) and the authenticated device id
//! (`--rate-limit-per-device`, which NAT does not blur; see [`crate::devices`]).

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Requests per second per key, with bursts of up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// One key's tokens. Also used on its own where the cost of a request is more than one token (a
/// task's global sample budget, [`crate::strategy::anon_embeddings`]).
pub struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    pub fn full(limit: RateLimit, now: Instant) -> Self {
        Bucket {
            tokens: limit.burst,
            updated: now,
        }
    }

    /// Takes `cost` tokens at `now`, or says how long until that many are back (nothing taken).
    pub fn take(&mut self, limit: RateLimit, cost: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(limit.burst);
        self.updated = now;
        if self.tokens >= cost {
            self.tokens -= cost;
            return Ok(());
        }
        Err(Duration::from_secs_f64((cost - self.tokens) / limit.per_second))
    }
}

/// The buckets of every key seen recently (an IP address by default).
pub struct RateLimiter<K = IpAddr> {
    limit: RateLimit,
    buckets: Mutex<HashMap<K, Bucket>>,
}

/// Keys whose buckets are full again are forgotten when the map grows past this size.
const PRUNE_ABOVE: usize = 100_000;

impl<K: Hash + Eq> RateLimiter<K> {
    pub fn new(limit: RateLimit) -> Self {
        assert!(
            limit.per_second > 0.0 && limit.burst >= 1.0,
            "a rate limit lets requests through"
        );
        RateLimiter {
            limit,
            buckets: Mutex::default(),
        }
    }

    /// Takes one token of `key`'s bucket at `now`, or says how long until one is back.
    pub fn check<Q>(&self, key: &Q, now: Instant) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let RateLimit { per_second, burst } = self.limit;
        let mut buckets = self.buckets.lock().expect("rate limit buckets");
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * per_second < burst
            });
        }
        // Looked up by reference first: the common case (a known key) copies nothing.
        if !buckets.contains_key(key) {
            buckets.insert(key.to_owned(), Bucket::full(self.limit, now));
        }
        let bucket = buckets.get_mut(key).expect("inserted above");
        bucket.take(self.limit, 1.0, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_address() {
        let limiter: RateLimiter = RateLimiter::new(RateLimit {
            per_second: 2.0,
            burst: 3.0,
        });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check(&a, t0).is_ok());
        }
        let wait = limiter.check(&a, t0).unwrap_err();
        assert_eq!(
            wait,
            Duration::from_millis(500),
            "one token is back after 1 / rate"
        );
        assert!(
            limiter.check(&b, t0).is_ok(),
            "another address has its own bucket"
        );
        assert!(limiter.check(&a, t0 + Duration::from_millis(400)).is_err());
        assert!(limiter.check(&a, t0 + Duration::from_millis(600)).is_ok());
        // Idle time refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.check(&a, later).is_ok());
        }
        assert!(limiter.check(&a, later).is_err());
    }

    #[test]
    fn a_bucket_takes_a_cost_whole_or_not_at_all() {
        let limit = RateLimit {
            per_second: 10.0,
            burst: 25.0,
        };
        let t0 = Instant::now();
        let mut bucket = Bucket::full(limit, t0);
        assert!(bucket.take(limit, 20.0, t0).is_ok());
        assert_eq!(bucket.take(limit, 10.0, t0), Err(Duration::from_millis(500)));
        assert!(bucket.take(limit, 5.0, t0).is_ok(), "a refusal took nothing");
        assert!(bucket.take(limit, 10.0, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn devices_have_buckets_of_their_own() {
        let limiter: RateLimiter<String> = RateLimiter::new(RateLimit {
            per_second: 1.0,
            burst: 1.0,
        });
        let t0 = Instant::now();
        assert!(limiter.check("dv-a", t0).is_ok());
        assert_eq!(limiter.check("dv-a", t0), Err(Duration::from_secs(1)));
        assert!(limiter.check("dv-b", t0).is_ok());
        assert!(limiter.check("dv-a", t0 + Duration::from_secs(1)).is_ok());
    }
}
