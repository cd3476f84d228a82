//! The checksum every reader's bytes go through (shared by `peers` and
//! `qcow-reader`, which cannot link beside it).

/// A checksum of every byte, in four independent lanes so that it runs at
/// memory speed; position-dependent (each lane is a multiply-rotate chain).
pub struct Checksum {
    lanes: [u64; 4],
    len: u64,
}

const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl Checksum {
    pub fn new() -> Self {
        Checksum {
            lanes: [1, 2, 3, 4],
            len: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut blocks = data.chunks_exact(32);
        for b in &mut blocks {
            self.mix(b);
        }
        let rest = blocks.remainder();
        if !rest.is_empty() {
            let mut a = [0u8; 32];
            a[..rest.len()].copy_from_slice(rest);
            self.mix(&a);
        }
        self.len = self.len.wrapping_add(data.len() as u64);
    }

    fn mix(&mut self, block: &[u8]) {
        for (lane, w) in self.lanes.iter_mut().zip(block.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            *lane = (*lane ^ u64::from_le_bytes(a))
                .wrapping_mul(K)
                .rotate_left(31);
        }
    }

    pub fn finish(&self) -> u64 {
        let mut h = self.len.wrapping_mul(K);
        for l in self.lanes {
            h = (h ^ l).wrapping_mul(K).rotate_left(27);
        }
        h
    }
}
