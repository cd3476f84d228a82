//! Read-ahead for sequential reads through [`crate::Disk`]: a reader that
//! walks the disk in small requests (4 KiB, one cluster) gets them served
//! from one window read ahead of it. One large read lets the core decode a
//! window's compressed clusters together (on every core, with the native
//! codec) and turns many small `pread`s into one; random reads pass
//! straight through. Memory: one window, allocated on first use.

/// The window [`crate::DiskOptions::default`] reads ahead: 4 MiB.
pub const DEFAULT_WINDOW: usize = 4 << 20;

/// Sequential-read detection and one window of bytes read ahead.
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    /// Window size in bytes; 0 turns read-ahead off.
    window: usize,
    buf: Vec<u8>,
    /// Guest offset of `buf[0]` and how many bytes of `buf` hold data.
    start: u64,
    valid: usize,
    /// Where the last request ended: a request starting here is sequential.
    next: u64,
}

impl ReadAhead {
    /// Read-ahead with a window of `window` bytes (0: off).
    pub(crate) fn new(window: usize) -> ReadAhead {
        ReadAhead {
            window,
            ..ReadAhead::default()
        }
    }

    /// Fills `out` with the disk's bytes at `offset`: from the window when
    /// it holds them, by reading a new window there when the request
    /// continues a sequential walk, else with `read` directly. `size` is
    /// the disk's size (windows stop there). A window read that fails is
    /// retried as the request alone, so errors are those of the bytes asked.
    pub(crate) fn read<E>(
        &mut self,
        offset: u64,
        out: &mut [u8],
        size: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let len = out.len() as u64;
        let Some(end) = offset.checked_add(len).filter(|&e| e <= size) else {
            // Out of range: the reader reports it.
            return read(offset, out);
        };
        if let Some(from) = self.held(offset, len) {
            out.copy_from_slice(&self.buf[from..from + out.len()]);
            self.next = end;
            return Ok(());
        }
        let sequential = offset == self.next || self.held(offset, 0).is_some();
        self.next = end;
        if !sequential || out.len() > self.window / 2 || out.is_empty() {
            return read(offset, out);
        }
        let n = self
            .window
            .min(usize::try_from(size - offset).unwrap_or(usize::MAX));
        if self.buf.len() < n {
            let more = n - self.buf.len();
            if self.buf.try_reserve_exact(more).is_err() {
                return read(offset, out);
            }
            self.buf.resize(n, 0);
        }
        self.valid = 0;
        if read(offset, &mut self.buf[..n]).is_err() {
            return read(offset, out);
        }
        self.start = offset;
        self.valid = n;
        out.copy_from_slice(&self.buf[..out.len()]);
        Ok(())
    }

    /// Where in the window `[offset, offset + len)` starts, if it holds it.
    fn held(&self, offset: u64, len: u64) -> Option<usize> {
        let from = offset.checked_sub(self.start)?;
        let to = from.checked_add(len)?;
        let inside = if len == 0 {
            from < self.valid as u64
        } else {
            to <= self.valid as u64
        };
        inside.then_some(from as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk whose byte at `i` is `i % 251`, counting the reads it serves.
    struct Pattern {
        reads: Vec<(u64, usize)>,
        fail_from: u64,
    }

    impl Pattern {
        fn read(&mut self, offset: u64, out: &mut [u8]) -> Result<(), u64> {
            self.reads.push((offset, out.len()));
            if offset
                .checked_add(out.len() as u64)
                .is_none_or(|end| end > self.fail_from)
            {
                return Err(offset);
            }
            for (i, b) in out.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    fn expect(offset: u64, out: &[u8]) {
        for (i, b) in out.iter().enumerate() {
            assert_eq!(
                *b,
                ((offset + i as u64) % 251) as u8,
                "byte {}",
                offset + i as u64
            );
        }
    }

    #[test]
    fn sequential_small_reads_are_served_from_windows() {
        let size = 10_000;
        let mut disk = Pattern {
            reads: vec![],
            fail_from: u64::MAX,
        };
        let mut ra = ReadAhead::new(4096);
        let mut buf = [0u8; 100];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(100) as usize;
            ra.read(pos, &mut buf[..n], size, |o, b| disk.read(o, b))
                .unwrap();
            expect(pos, &buf[..n]);
            pos += n as u64;
        }
        // Windows at 0, 4000 (the request at 4000 straddles the first
        // window's end) and 8000 (clipped to the disk).
        assert_eq!(disk.reads, vec![(0, 4096), (4000, 4096), (8000, 2000)]);
    }

    #[test]
    fn random_and_large_reads_pass_through() {
        let size = 1 << 20;
        let mut disk = Pattern {
            reads: vec![],
            fail_from: u64::MAX,
        };
        let mut ra = ReadAhead::new(4096);
        let mut big = vec![0u8; 3000];
        let mut small = [0u8; 10];
        // First request at 0 counts as sequential: a window.
        ra.read(0, &mut small, size, |o, b| disk.read(o, b))
            .unwrap();
        expect(0, &small);
        // A jump elsewhere: read as asked.
        ra.read(500_000, &mut small, size, |o, b| disk.read(o, b))
            .unwrap();
        expect(500_000, &small);
        // Sequential but larger than half the window: as asked.
        ra.read(500_010, &mut big, size, |o, b| disk.read(o, b))
            .unwrap();
        expect(500_010, &big);
        // Back inside the first window: no read at all.
        ra.read(100, &mut small, size, |o, b| disk.read(o, b))
            .unwrap();
        expect(100, &small);
        assert_eq!(disk.reads, vec![(0, 4096), (500_000, 10), (500_010, 3000)]);
    }

    #[test]
    fn a_request_straddling_the_window_end_reads_the_next_window() {
        let size = 1 << 20;
        let mut disk = Pattern {
            reads: vec![],
            fail_from: u64::MAX,
        };
        let mut ra = ReadAhead::new(1000);
        let mut buf = [0u8; 300];
        ra.read(0, &mut buf, size, |o, b| disk.read(o, b)).unwrap();
        ra.read(900, &mut buf, size, |o, b| disk.read(o, b))
            .unwrap();
        expect(900, &buf);
        assert_eq!(disk.reads, vec![(0, 1000), (900, 1000)]);
    }

    #[test]
    fn a_failing_window_retries_the_request_alone_and_errors_are_its_own() {
        let size = 1 << 20;
        let mut disk = Pattern {
            reads: vec![],
            fail_from: 2000,
        };
        let mut ra = ReadAhead::new(4096);
        let mut buf = [0u8; 100];
        // The window [0, 4096) fails, the request [0, 100) does not.
        ra.read(0, &mut buf, size, |o, b| disk.read(o, b)).unwrap();
        expect(0, &buf);
        ra.read(100, &mut buf, size, |o, b| disk.read(o, b))
            .unwrap();
        expect(100, &buf);
        // A request that fails itself reports its own error.
        assert_eq!(
            ra.read(1950, &mut buf, size, |o, b| disk.read(o, b)),
            Err(1950)
        );
        assert_eq!(
            disk.reads,
            vec![(0, 4096), (0, 100), (100, 4096), (100, 100), (1950, 100)]
        );
    }

    #[test]
    fn off_and_out_of_range_requests_go_to_the_reader() {
        let mut disk = Pattern {
            reads: vec![],
            fail_from: u64::MAX,
        };
        let mut off = ReadAhead::new(0);
        let mut buf = [0u8; 10];
        off.read(0, &mut buf, 100, |o, b| disk.read(o, b)).unwrap();
        off.read(10, &mut buf, 100, |o, b| disk.read(o, b)).unwrap();
        let mut on = ReadAhead::new(4096);
        // Past the end: the reader decides (here it succeeds; a real disk
        // reports OutOfBounds).
        on.read(95, &mut buf, 100, |o, b| disk.read(o, b)).unwrap();
        on.read(u64::MAX - 5, &mut buf, 100, |o, b| disk.read(o, b))
            .unwrap_err();
        assert_eq!(
            disk.reads,
            vec![(0, 10), (10, 10), (95, 10), (u64::MAX - 5, 10)]
        );
    }
}
