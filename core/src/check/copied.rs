//! The COPIED flags of the active tables, compared with the on-disk
//! refcounts.

use alloc::format;

use crate::bytes::to_usize;
use crate::error::Error;
use crate::image::Image;
use crate::io::BlockRead;
use crate::l2::{self, COPIED};

use super::{Findings, OnDiskRefcounts};

impl<R: BlockRead> Image<R> {
    pub(super) fn check_copied(
        &mut self,
        rep: &mut Findings<'_>,
        disk_rc: &mut OnDiskRefcounts,
    ) -> Result<(), Error<R::Error>> {
        let cb = self.header.cluster_bits;
        let cs = 1u64 << cb;
        let mut refcount_of =
            |io: &mut R, off: u64| -> Result<u64, R::Error> { disk_rc.get(io, off >> cb) };
        let fmt = self.fmt;
        let mut table = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2_off = l2::l1_offset(e);
            if l2_off == 0 || !l2_off.is_multiple_of(cs) {
                continue;
            }
            let rc = refcount_of(&mut self.io, l2_off).map_err(Error::Io)?;
            if (rc == 1) != (e & COPIED != 0) {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
            }
            self.io.read_at(l2_off, &mut table).map_err(Error::Io)?;
            if fmt.data_file {
                continue;
            }
            for j in 0..table.len() / fmt.entry_size() {
                let (entry, Some(host)) = fmt.host_cluster_at(&table, j) else {
                    continue;
                };
                let rc = refcount_of(&mut self.io, host).map_err(Error::Io)?;
                if (rc == 1) != (entry & COPIED != 0) {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                    ));
                }
            }
        }
        Ok(())
    }
}
