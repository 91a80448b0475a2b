//! Upload bodies are read into buffers that the next uploads reuse.
//!
//! A fresh model-sized buffer per upload (4 MB at a million parameters) is mapped by glibc on its
//! own and unmapped when freed, so every upload paid a page fault per 4 KiB and the kernel zeroing
//! each page: page faults were 13 % of the server's CPU under upload load (`perf`, 2026-12-07,
//! docs/benchmarks.md). The buffers kept here are as many as there are upload slots, since no more
//! bodies are read at once, so memory stays what the slots already allow.
//!
//! A body starts on a page boundary ([`DIRECT_IO_ALIGN`]), so the blob store can write its whole
//! pages to the disk straight from the buffer (`O_DIRECT`) rather than copy them into the page cache.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::blobs::DIRECT_IO_ALIGN;

/// Free buffers, at most `keep` of them.
#[derive(Debug)]
pub struct BodyBuffers {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

/// A buffer taken from a [`BodyBuffers`]; back there when dropped, or when the last [`Bytes`]
/// made of it by [`PooledBuffer::freeze`] is. The body is `data[start..]`, page-aligned; the bytes
/// before it are padding.
#[derive(Debug)]
pub struct PooledBuffer {
    data: Vec<u8>,
    start: usize,
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
        // Padding up to the page boundary, within the kept allocation (none in a new `Vec`).
        let start = data.as_ptr().align_offset(DIRECT_IO_ALIGN).min(data.capacity());
        data.resize(start, 0);
        let mut buffer = PooledBuffer {
            data,
            start,
            home: self.clone(),
        };
        buffer.reserve(capacity);
        buffer
    }

    /// Buffers kept for reuse now.
    pub fn kept(&self) -> usize {
        self.free.lock().expect("body buffers").len()
    }
}

impl PooledBuffer {
    /// Appends `bytes` to the body.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.data.extend_from_slice(bytes);
    }

    /// Room for `more` bytes past the body. Growing moves the body to a new allocation, aligned
    /// again (a `Vec`'s own growth would keep the padding but not the alignment); with a declared
    /// length the buffer is sized once and never grows.
    fn reserve(&mut self, more: usize) {
        let len = self.data.len() - self.start;
        if self.data.capacity() - self.start >= len + more {
            return;
        }
        let mut data = Vec::<u8>::with_capacity((len + more).max(2 * len) + DIRECT_IO_ALIGN - 1);
        let start = data.as_ptr().align_offset(DIRECT_IO_ALIGN);
        data.resize(start, 0);
        data.extend_from_slice(&self.data[self.start..]);
        self.data = data;
        self.start = start;
    }

    /// Shareable bytes of the buffer, which goes back to its pool once every clone is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.data[self.start..]
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

    fn aligned(buffer: &PooledBuffer) -> bool {
        (buffer.as_ref().as_ptr() as usize).is_multiple_of(DIRECT_IO_ALIGN)
    }

    /// A buffer comes back when the last clone of its bytes goes, and is handed out again with its
    /// memory (same allocation); no more than `keep` are kept.
    #[test]
    fn buffers_come_back_when_their_bytes_are_dropped() {
        let buffers = BodyBuffers::new(2);
        let mut first = buffers.take(1 << 20);
        first.extend_from_slice(&[7; 1000]);
        let address = first.as_ref().as_ptr();
        let bytes = first.freeze();
        let view = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(buffers.kept(), 0, "a view still holds it");
        assert_eq!(&view[..], &[7; 10]);
        drop(view);
        assert_eq!(buffers.kept(), 1);

        let mut again = buffers.take(1000);
        assert!(again.as_ref().is_empty(), "handed out empty");
        again.extend_from_slice(&[1; 1 << 20]);
        assert_eq!(
            again.as_ref().as_ptr(),
            address,
            "the same memory, with room for the old size"
        );

        let (a, b, c) = (buffers.take(10), buffers.take(10), buffers.take(10));
        drop((again, a, b, c));
        assert_eq!(buffers.kept(), 2, "at most `keep`");
    }

    /// The body starts on a page boundary whether the buffer is new, kept, or grown past its size
    /// (a body without a declared length), and growing keeps its bytes.
    #[test]
    fn bodies_start_on_a_page_boundary() {
        let buffers = BodyBuffers::new(1);
        let mut buffer = buffers.take(0);
        let mut expected = Vec::new();
        for i in 0..300u32 {
            let chunk: Vec<u8> = (0..(i * 37 % 5000)).map(|j| (i + j) as u8).collect();
            buffer.extend_from_slice(&chunk);
            expected.extend_from_slice(&chunk);
            // (An empty buffer may not have allocated: nothing to align.)
            assert!(
                expected.is_empty() || aligned(&buffer),
                "after {} bytes",
                expected.len()
            );
        }
        assert_eq!(buffer.as_ref(), &expected[..]);
        drop(buffer);
        let mut kept = buffers.take(100);
        kept.extend_from_slice(&[9; 100]);
        assert!(aligned(&kept));
        assert_eq!(kept.freeze().as_ptr() as usize % DIRECT_IO_ALIGN, 0);
    }
}
