//! The replies a request handler gives, as traits, so that one handler serves both
//! transports: fuser's reply objects over /dev/fuse (implemented here by
//! delegation) and the ring entries of FUSE-over-io_uring (`super::ring`), which
//! fuser cannot carry. Each trait is the part of fuser's reply API the handlers
//! use, with the same meaning; a reply is consumed by its answer, once.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::time::Duration;

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
};

use crate::sys::fuse_dev::RingBacking;
use crate::union::StatFs;

/// A passthrough backing file, made by the transport that will name it in its
/// reply: the kernel's backing ids belong to the /dev/fuse connection, and fuser's
/// `BackingId` can be named only in fuser's replies.
#[derive(Debug)]
pub(crate) enum Backing {
    Channel(BackingId),
    Ring(RingBacking),
}

/// Every reply can be an error.
pub(crate) trait Fails {
    fn error(self, err: Errno);
}

pub(crate) trait EmptyReply: Fails {
    fn ok(self);
}

pub(crate) trait EntryReply: Fails {
    fn entry(self, ttl: &Duration, attr: &FileAttr, generation: Generation);
}

pub(crate) trait AttrReply: Fails {
    fn attr(self, ttl: &Duration, attr: &FileAttr);
}

pub(crate) trait DataReply: Fails {
    fn data(self, data: &[u8]);
}

/// Opens a backing file for a passthrough open.
pub(crate) trait MakesBacking {
    fn open_backing(&self, file: &File) -> io::Result<Backing>;
}

pub(crate) trait OpenReply: Fails + MakesBacking {
    fn opened(self, fh: FileHandle, flags: FopenFlags);
    fn opened_passthrough(self, fh: FileHandle, flags: FopenFlags, backing: &Backing);
}

pub(crate) trait CreateReply: Fails + MakesBacking {
    fn created(
        self,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
        fh: FileHandle,
        flags: FopenFlags,
    );
    fn created_passthrough(
        self,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
        fh: FileHandle,
        flags: FopenFlags,
        backing: &Backing,
    );
}

pub(crate) trait WriteReply: Fails {
    fn written(self, size: u32);
}

pub(crate) trait StatfsReply: Fails {
    fn statfs(self, s: &StatFs);
}

pub(crate) trait XattrReply: Fails {
    fn size(self, size: u32);
    fn value(self, data: &[u8]);
}

pub(crate) trait IoctlReply: Fails {
    fn ioctl(self, result: i32, data: &[u8]);
}

pub(crate) trait LseekReply: Fails {
    fn offset(self, offset: i64);
}

/// A directory listing: `add` answers true once the reply is full (the entry was
/// not added).
pub(crate) trait DirReply: Fails {
    fn add(&mut self, ino: INodeNo, offset: u64, kind: FileType, name: &OsStr) -> bool;
    fn ok(self);
}

pub(crate) trait DirPlusReply: Fails {
    fn add(
        &mut self,
        offset: u64,
        name: &OsStr,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
    ) -> bool;
    fn ok(self);
}

macro_rules! fails_by_fuser {
    ($($t:ty),*) => {$(
        impl Fails for $t {
            fn error(self, err: Errno) {
                <$t>::error(self, err)
            }
        }
    )*};
}

fails_by_fuser!(
    ReplyEmpty,
    ReplyEntry,
    ReplyAttr,
    ReplyData,
    ReplyOpen,
    ReplyCreate,
    ReplyWrite,
    ReplyStatfs,
    ReplyXattr,
    ReplyIoctl,
    ReplyLseek,
    ReplyDirectory,
    ReplyDirectoryPlus
);

/// A backing made by the ring transport cannot be named in a fuser reply. It
/// never meets one: once the ring serves a connection, the kernel sends no open
/// over /dev/fuse. Should it happen, the open fails rather than naming a wrong id.
fn channel_backing(backing: &Backing) -> Option<&BackingId> {
    match backing {
        Backing::Channel(id) => Some(id),
        Backing::Ring(_) => None,
    }
}

impl EmptyReply for ReplyEmpty {
    fn ok(self) {
        ReplyEmpty::ok(self)
    }
}

impl EntryReply for ReplyEntry {
    fn entry(self, ttl: &Duration, attr: &FileAttr, generation: Generation) {
        ReplyEntry::entry(self, ttl, attr, generation)
    }
}

impl AttrReply for ReplyAttr {
    fn attr(self, ttl: &Duration, attr: &FileAttr) {
        ReplyAttr::attr(self, ttl, attr)
    }
}

impl DataReply for ReplyData {
    fn data(self, data: &[u8]) {
        ReplyData::data(self, data)
    }
}

impl MakesBacking for ReplyOpen {
    fn open_backing(&self, file: &File) -> io::Result<Backing> {
        ReplyOpen::open_backing(self, file).map(Backing::Channel)
    }
}

impl OpenReply for ReplyOpen {
    fn opened(self, fh: FileHandle, flags: FopenFlags) {
        ReplyOpen::opened(self, fh, flags)
    }

    fn opened_passthrough(self, fh: FileHandle, flags: FopenFlags, backing: &Backing) {
        match channel_backing(backing) {
            Some(id) => ReplyOpen::opened_passthrough(self, fh, flags, id),
            None => ReplyOpen::error(self, Errno::EIO),
        }
    }
}

impl MakesBacking for ReplyCreate {
    fn open_backing(&self, file: &File) -> io::Result<Backing> {
        ReplyCreate::open_backing(self, file).map(Backing::Channel)
    }
}

impl CreateReply for ReplyCreate {
    fn created(
        self,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
        fh: FileHandle,
        flags: FopenFlags,
    ) {
        ReplyCreate::created(self, ttl, attr, generation, fh, flags)
    }

    fn created_passthrough(
        self,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
        fh: FileHandle,
        flags: FopenFlags,
        backing: &Backing,
    ) {
        match channel_backing(backing) {
            Some(id) => {
                ReplyCreate::created_passthrough(self, ttl, attr, generation, fh, flags, id)
            }
            None => ReplyCreate::error(self, Errno::EIO),
        }
    }
}

impl WriteReply for ReplyWrite {
    fn written(self, size: u32) {
        ReplyWrite::written(self, size)
    }
}

impl StatfsReply for ReplyStatfs {
    fn statfs(self, s: &StatFs) {
        ReplyStatfs::statfs(
            self, s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        )
    }
}

impl XattrReply for ReplyXattr {
    fn size(self, size: u32) {
        ReplyXattr::size(self, size)
    }

    fn value(self, data: &[u8]) {
        ReplyXattr::data(self, data)
    }
}

impl IoctlReply for ReplyIoctl {
    fn ioctl(self, result: i32, data: &[u8]) {
        ReplyIoctl::ioctl(self, result, data)
    }
}

impl LseekReply for ReplyLseek {
    fn offset(self, offset: i64) {
        ReplyLseek::offset(self, offset)
    }
}

impl DirReply for ReplyDirectory {
    fn add(&mut self, ino: INodeNo, offset: u64, kind: FileType, name: &OsStr) -> bool {
        ReplyDirectory::add(self, ino, offset, kind, name)
    }

    fn ok(self) {
        ReplyDirectory::ok(self)
    }
}

impl DirPlusReply for ReplyDirectoryPlus {
    fn add(
        &mut self,
        offset: u64,
        name: &OsStr,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
    ) -> bool {
        ReplyDirectoryPlus::add(self, attr.ino, offset, name, ttl, attr, generation)
    }

    fn ok(self) {
        ReplyDirectoryPlus::ok(self)
    }
}
