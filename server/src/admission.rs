//! Upload admission: how many uploads the server processes at once, how many may wait, and when a
//! refused device should come back.
//!
//! An upload that waits for a processing slot keeps its connection open with the unread body in
//! the kernel's socket buffers (the server's receive queue, and on one machine the sender's too).
//! With thousands of devices uploading model-sized bodies at once those buffers exhaust the
//! kernel's TCP memory (`net.ipv4.tcp_mem`); it then drops packets on every connection and
//! retransmission backoff stalls the whole server for tens of seconds (measured with 1,000
//! devices x 4 MB on one machine: `TcpExtTCPMemoryPressures`, `TCPRcvQDrop`). So only a bounded
//! queue waits; beyond it the server answers `503 server_busy` at once, with a time to retry.
//! Retry times are handed out one processing interval apart (the measured time an upload holds
//! a slot, divided by the slots), so refused devices come back spread at the rate the server
//! drains them instead of all together.

use std::sync::{
    Mutex,
    atomic::{AtomicUsize, Ordering},
};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Shortest and longest retry time handed out.
const MIN_RETRY_MS: f64 = 100.0;
const MAX_RETRY_MS: f64 = 60_000.0;

pub struct UploadAdmission {
    slots: Semaphore,
    slot_count: usize,
    max_queued: usize,
    waiting: AtomicUsize,
    pace: Mutex<Pace>,
}

/// Moving estimate of how long an upload holds a slot, and the next retry time not yet given out.
struct Pace {
    service_ms: f64,
    next_retry_at: Instant,
}

/// A held processing slot; records how long it was held when dropped.
pub struct UploadSlot<'a> {
    _permit: SemaphorePermit<'a>,
    admission: &'a UploadAdmission,
    since: Instant,
}

/// Counts a request as waiting for a slot while it is alive (also when its future is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl UploadAdmission {
    /// `slots` uploads are processed at once and at most `max_queued` more wait for a slot.
    pub fn new(slots: usize, max_queued: usize) -> Self {
        let slots = slots.max(1);
        UploadAdmission {
            slots: Semaphore::new(slots),
            slot_count: slots,
            max_queued,
            waiting: AtomicUsize::new(0),
            pace: Mutex::new(Pace {
                service_ms: 50.0,
                next_retry_at: Instant::now(),
            }),
        }
    }

    /// A processing slot, after waiting in the queue if it has room; otherwise `Err` with the
    /// milliseconds after which this device should try again.
    pub async fn enter(&self) -> Result<UploadSlot<'_>, u64> {
        let permit = match self.slots.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
                let waiting = Waiting(&self.waiting);
                if ahead >= self.max_queued {
                    return Err(self.retry_after_ms());
                }
                let permit = self.slots.acquire().await.expect("upload slots never close");
                drop(waiting);
                permit
            }
        };
        Ok(UploadSlot {
            _permit: permit,
            admission: self,
            since: Instant::now(),
        })
    }

    /// Uploads waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Processing slots in all.
    pub fn slots(&self) -> usize {
        self.slot_count
    }

    /// Processing slots held now.
    pub fn busy(&self) -> usize {
        self.slot_count - self.slots.available_permits()
    }

    /// The next free retry time: after the queue ahead has drained, one processing interval after
    /// the last one handed out.
    fn retry_after_ms(&self) -> u64 {
        let now = Instant::now();
        let mut pace = self.pace.lock().expect("admission pace");
        let interval_ms = pace.service_ms / self.slot_count as f64;
        let queue_drained = now + ms(interval_ms * self.max_queued as f64);
        let at = pace.next_retry_at.max(queue_drained) + ms(interval_ms);
        pace.next_retry_at = at;
        let wait = at.duration_since(now).as_secs_f64() * 1000.0;
        wait.clamp(MIN_RETRY_MS, MAX_RETRY_MS) as u64
    }

    fn record_service(&self, held: Duration) {
        let mut pace = self.pace.lock().expect("admission pace");
        pace.service_ms = 0.9 * pace.service_ms + 0.1 * held.as_secs_f64() * 1000.0;
    }
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1000.0)
}

impl Drop for UploadSlot<'_> {
    fn drop(&mut self) {
        self.admission.record_service(self.since.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_with_spread_retry_times() {
        let admission = UploadAdmission::new(1, 1);
        let held = admission.enter().await.expect("a free slot");
        // One request may wait for the slot ...
        let queued = admission.enter();
        tokio::pin!(queued);
        assert!(futures_poll_pending(queued.as_mut()).await);
        assert_eq!(admission.waiting(), 1);
        // ... the next ones are refused, each told to come back one interval after the previous.
        let first = admission.enter().await.err().expect("queue full");
        let second = admission.enter().await.err().expect("queue full");
        assert!(second > first, "retry times {first} then {second} ms");
        assert!(first >= MIN_RETRY_MS as u64);
        assert_eq!(admission.waiting(), 1, "refused requests do not stay counted");
        // Releasing the slot admits the queued one.
        drop(held);
        let slot = queued.await.expect("admitted after the slot was released");
        assert_eq!(admission.waiting(), 0);
        drop(slot);
    }

    #[tokio::test]
    async fn a_dropped_waiter_leaves_the_queue() {
        let admission = UploadAdmission::new(1, 1);
        let _held = admission.enter().await.expect("a free slot");
        {
            let queued = admission.enter();
            tokio::pin!(queued);
            assert!(futures_poll_pending(queued.as_mut()).await);
            assert_eq!(admission.waiting(), 1);
        }
        assert_eq!(
            admission.waiting(),
            0,
            "a cancelled wait (client gone) frees its place"
        );
        let queued_again = admission.enter();
        tokio::pin!(queued_again);
        assert!(futures_poll_pending(queued_again.as_mut()).await);
    }

    /// Polls once; true if the future is still pending.
    async fn futures_poll_pending<F: std::future::Future>(mut f: std::pin::Pin<&mut F>) -> bool {
        std::future::poll_fn(move |cx| std::task::Poll::Ready(f.as_mut().poll(cx).is_pending())).await
    }
}
