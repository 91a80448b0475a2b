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
//! Retry times are handed out one processing interval apart (the time an upload holds a slot,
//! divided by the slots), so refused devices come back spread at the rate the server drains them
//! instead of all together.
//!
//! A retry time is a promise the server cannot take back: one too late leaves the server idle
//! while the device sleeps, and with K near the number of devices the round waits for it. So the
//! interval is the median of the last holds (a stall, such as a round being finalised under a
//! burst of model downloads, does not stretch it), and each promise is placed behind the queue and
//! the promises still outstanding at the current interval, not behind the last one given out:
//! promises made during a slow moment do not push back every promise after it. (Measured with
//! 1,000 devices per round: an average of the holds, and promises chained one after another, told
//! devices to come back in up to 26 s where 6 s would have done, and the server idled for 10-15 s
//! of a round; see docs/benchmarks.md.)

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::{
    Mutex,
    atomic::{AtomicUsize, Ordering},
};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Shortest and longest retry time handed out.
const MIN_RETRY_MS: f64 = 100.0;
const MAX_RETRY_MS: f64 = 60_000.0;
/// Slot holds the interval is the median of.
const HOLDS_KEPT: usize = 32;
/// The hold assumed before any upload has finished.
const FIRST_HOLD_MS: f64 = 50.0;

pub struct UploadAdmission {
    slots: Semaphore,
    slot_count: usize,
    max_queued: usize,
    waiting: AtomicUsize,
    pace: Mutex<Pace>,
}

/// How long uploads hold a slot lately, and the retry times promised and not yet due.
#[derive(Default)]
struct Pace {
    /// The last [`HOLDS_KEPT`] holds in milliseconds, oldest first.
    holds_ms: VecDeque<f64>,
    promised: BinaryHeap<Reverse<Instant>>,
}

impl Pace {
    fn record(&mut self, held: Duration) {
        if self.holds_ms.len() == HOLDS_KEPT {
            self.holds_ms.pop_front();
        }
        self.holds_ms.push_back(held.as_secs_f64() * 1000.0);
    }

    /// The median of the holds kept.
    fn hold_ms(&self) -> f64 {
        let mut holds: Vec<f64> = self.holds_ms.iter().copied().collect();
        if holds.is_empty() {
            return FIRST_HOLD_MS;
        }
        holds.sort_by(f64::total_cmp);
        holds[holds.len() / 2]
    }

    /// A retry time for a device refused at `now`: one interval after the `queued` uploads and
    /// the promises not yet due, at the current interval.
    fn promise(&mut self, now: Instant, slots: usize, queued: usize) -> Duration {
        while self.promised.peek().is_some_and(|Reverse(at)| *at <= now) {
            self.promised.pop();
        }
        let interval_ms = self.hold_ms() / slots as f64;
        let ahead = queued + self.promised.len() + 1;
        let wait_ms = (interval_ms * ahead as f64).clamp(MIN_RETRY_MS, MAX_RETRY_MS);
        let wait = Duration::from_micros((wait_ms * 1000.0).round() as u64);
        self.promised.push(Reverse(now + wait));
        wait
    }
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
            pace: Mutex::default(),
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

    /// The next free retry time: after the full queue ahead and the devices already told to come
    /// back, one processing interval apart.
    fn retry_after_ms(&self) -> u64 {
        let mut pace = self.pace.lock().expect("admission pace");
        let wait = pace.promise(Instant::now(), self.slot_count, self.max_queued);
        wait.as_millis() as u64
    }

    fn record_service(&self, held: Duration) {
        self.pace.lock().expect("admission pace").record(held);
    }
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

    #[test]
    fn retry_times_follow_the_median_hold_and_the_promises_outstanding() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut pace = Pace::default();
        for _ in 0..HOLDS_KEPT {
            pace.record(ms(20));
        }
        // 2 slots: an upload drains every 10 ms; 30 queued, then this device: 310 ms.
        assert_eq!(pace.promise(now, 2, 30), ms(310));
        assert_eq!(pace.promise(now, 2, 30), ms(320));
        // A stall of a few uploads does not move the median.
        for _ in 0..5 {
            pace.record(ms(2_000));
        }
        assert_eq!(pace.promise(now, 2, 30), ms(330));
        // A sustained slowdown does: each promise is ten times as far apart ...
        for _ in 0..HOLDS_KEPT {
            pace.record(ms(200));
        }
        assert_eq!(pace.promise(now, 2, 30), ms(3_400));
        assert_eq!(pace.promise(now, 2, 30), ms(3_500));
        // ... and once the server is fast again, the next promise is placed behind the ones
        // outstanding at the fast interval, not behind the slow moment's last promise.
        for _ in 0..HOLDS_KEPT {
            pace.record(ms(20));
        }
        assert_eq!(pace.promise(now, 2, 30), ms(360));
        // Promises that have come due no longer count.
        assert_eq!(pace.promise(now + ms(5_000), 2, 30), ms(310));
    }

    /// Polls once; true if the future is still pending.
    async fn futures_poll_pending<F: std::future::Future>(mut f: std::pin::Pin<&mut F>) -> bool {
        std::future::poll_fn(move |cx| std::task::Poll::Ready(f.as_mut().poll(cx).is_pending())).await
    }
}
