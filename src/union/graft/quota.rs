//! Size accounting of operations on files of size-limited volumes: a growth is
//! reserved before the operation and settled with the size actually reached after
//! it (see `volume::quota` for what is counted and why).

use std::sync::Arc;

use crate::union::dispatch::Route;
use crate::union::inode::Inode;
use crate::union::{Errno, Ino, Result, Union};
use crate::volume::quota::Quota;

impl Union {
    /// Reserves the growth of `ino` to the size `new_size(current size)` when it lies
    /// in a size-limited volume (ENOSPC when that does not fit). The returned charge
    /// settles the ledger with the size actually reached when dropped, after the
    /// operation.
    pub(crate) fn quota_charge(
        &self,
        ino: Ino,
        new_size: impl FnOnce(u64) -> u64,
    ) -> Result<Option<QuotaCharge<'_>>> {
        let Route::Graft(inode, gi) = self.route(ino) else {
            return Ok(None);
        };
        let Some(quota) = &self.grafts.list[gi].quota else {
            return Ok(None);
        };
        let serial = quota.serialize();
        let old = self.stat_inode(&inode)?.st_size as u64;
        let reserved = new_size(old).saturating_sub(old);
        quota.reserve(reserved)?;
        Ok(Some(QuotaCharge {
            union: self,
            quota,
            inode,
            old,
            reserved,
            _serial: serial,
        }))
    }

    /// `quota_charge` for fallocate(2) `mode`. Allocation beyond the end of file that
    /// keeps the size would use space the apparent-size accounting cannot see, so it
    /// is refused on a size-limited volume.
    pub(crate) fn quota_fallocate(
        &self,
        ino: Ino,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<Option<QuotaCharge<'_>>> {
        let end = offset.saturating_add(length);
        let mut beyond_eof_kept = false;
        let charge = self.quota_charge(ino, |old| {
            if mode & libc::FALLOC_FL_INSERT_RANGE != 0 {
                old.saturating_add(length)
            } else if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_COLLAPSE_RANGE) != 0 {
                old
            } else if mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
                beyond_eof_kept = end > old;
                old
            } else {
                old.max(end)
            }
        })?;
        if beyond_eof_kept && charge.is_some() {
            return Err(Errno::OPNOTSUPP.into());
        }
        Ok(charge)
    }
}

/// A size change in progress on a size-limited volume (see `Union::quota_charge`).
pub(crate) struct QuotaCharge<'a> {
    union: &'a Union,
    quota: &'a Quota,
    inode: Arc<Inode>,
    old: u64,
    reserved: u64,
    _serial: parking_lot::ArcMutexGuard<parking_lot::RawMutex, ()>,
}

impl Drop for QuotaCharge<'_> {
    fn drop(&mut self) {
        // A file removed meanwhile had its bytes given back by the removal.
        let new = match self.union.stat_inode(&self.inode) {
            Ok(st) => st.st_size as u64,
            Err(_) => self.old + self.reserved,
        };
        let delta = new as i128 - self.old as i128 - self.reserved as i128;
        self.quota
            .adjust(delta.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
    }
}
