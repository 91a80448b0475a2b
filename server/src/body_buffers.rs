//! Upload bodies are read into buffers that the next uploads reuse.
//!
//! A fresh model-sized buffer per upload (4 MB at a million parameters) is mapped by glibc on its
//! own and unmapped when freed, so every upload paid a page fault per 4 KiB and the kernel zeroing
//! each page: page faults were 13 % of the server's CPU under upload load (`perf`, 2026-12-07,
//! docs/benchmarks.md). The buffers kept here are as many as there are upload slots, since no more
//! bodies are read at once, so memory stays what the slots already allow.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Free buffers, at most `keep` of them.
#[derive(Debug)]
pub struct BodyBuffers {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

/// A buffer taken from a [`BodyBuffers`]; back there when dropped, or when the last [`Bytes`]
/// made of it by [`PooledBuffer::freeze`] is.
#[derive(Debug)]
pub struct PooledBuffer {
    data: Vec<u8>,
    home: Arc<BodyBuffers>,
}

impl BodyBuffers {
    pub fn new(keep: usize) -> Arc<Self> {
        Arc::new(BodyBuffers {
            free: Mutex::new(Vec::with_capacity(keep)),
            keep,
        })
    }

    /// An empty buffer with room for `capacity` bytes, a kept one if there is one.
    pub fn take(self: &Arc<Self>, capacity: usize) -> PooledBuffer {
        let mut data = self.free.lock().expect("body buffers").pop().unwrap_or_default();
        data.reserve(capacity);
        PooledBuffer {
            data,
            home: self.clone(),
        }
    }

    /// Buffers kept for reuse now.
    pub fn kept(&self) -> usize {
        self.free.lock().expect("body buffers").len()
    }
}

impl PooledBuffer {
    /// The buffer to fill.
    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }

    /// Shareable bytes of the buffer, which goes back to its pool once every clone is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let mut data = std::mem::take(&mut self.data);
        data.clear();
        if let Ok(mut free) = self.home.free.lock()
            && free.len() < self.home.keep
        {
            free.push(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer comes back when the last clone of its bytes goes, and is handed out again with its
    /// memory (same allocation); no more than `keep` are kept.
    #[test]
    fn buffers_come_back_when_their_bytes_are_dropped() {
        let buffers = BodyBuffers::new(2);
        let mut first = buffers.take(1 << 20);
        first.vec_mut().extend_from_slice(&[7; 1000]);
        let address = first.as_ref().as_ptr();
        let bytes = first.freeze();
        let view = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(buffers.kept(), 0, "a view still holds it");
        assert_eq!(&view[..], &[7; 10]);
        drop(view);
        assert_eq!(buffers.kept(), 1);

        let mut again = buffers.take(1000);
        assert!(again.vec_mut().is_empty(), "handed out empty");
        assert!(again.vec_mut().capacity() >= 1 << 20);
        again.vec_mut().push(1);
        assert_eq!(again.as_ref().as_ptr(), address, "the same memory");

        let (a, b, c) = (buffers.take(10), buffers.take(10), buffers.take(10));
        drop((again, a, b, c));
        assert_eq!(buffers.kept(), 2, "at most `keep`");
    }
}
