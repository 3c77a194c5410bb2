//! Request accounting, switched on by `STRATAFS_STATS`: per FUSE opcode, how many
//! requests the daemon answered, and the total and longest time it spent on them
//! (from the callback's start to its return, which includes the reply). It is how
//! the cost of a workload is judged: requests per file created, removed or stat'ed,
//! next to the minimum a FUSE filesystem needs.
//!
//! `STRATAFS_STATS=1` writes the table to the log, `STRATAFS_STATS=/path` to that
//! file (replaced at each dump); it is dumped on SIGUSR1 and when the session ends.
//!
//! Invariants: recording is lock-free (relaxed atomics: the counters are read only
//! for a report, where a request counted in one column and not yet in another is
//! harmless); an opcode not in [`OPS`] is counted under "other" rather than lost;
//! switched off, the request path pays one branch.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Every opcode the adapter registers, in the order the report lists them.
const OPS: &[&str] = &[
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "create",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "readdirplus",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "fallocate",
    "lseek",
    "copy_file_range",
    "other",
];

#[derive(Default)]
struct Counters {
    count: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
}

/// Where a report goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Log,
    File(PathBuf),
}

pub struct RequestStats {
    counters: Vec<Counters>,
    since: Instant,
    sink: Sink,
}

impl RequestStats {
    /// The accounting `STRATAFS_STATS` asks for, if any: unset, empty or `0` is off,
    /// `1` reports to the log, anything else is a file path.
    pub fn from_env() -> Option<RequestStats> {
        let v = std::env::var_os("STRATAFS_STATS")?;
        let sink = match v.to_str() {
            Some("") | Some("0") => return None,
            Some("1") => Sink::Log,
            _ => Sink::File(PathBuf::from(v)),
        };
        Some(RequestStats::new(sink))
    }

    pub fn new(sink: Sink) -> RequestStats {
        RequestStats {
            counters: OPS.iter().map(|_| Counters::default()).collect(),
            since: Instant::now(),
            sink,
        }
    }

    /// Counts one request of `op` that took `took`.
    pub fn record(&self, op: &str, took: Duration) {
        let i = OPS.iter().position(|o| *o == op).unwrap_or(OPS.len() - 1);
        let c = &self.counters[i];
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        c.count.fetch_add(1, Ordering::Relaxed);
        c.total_ns.fetch_add(ns, Ordering::Relaxed);
        c.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// (opcode, count, total, max) of every opcode seen at least once.
    pub fn snapshot(&self) -> Vec<(&'static str, u64, Duration, Duration)> {
        OPS.iter()
            .zip(&self.counters)
            .filter_map(|(op, c)| {
                let n = c.count.load(Ordering::Relaxed);
                (n > 0).then(|| {
                    (
                        *op,
                        n,
                        Duration::from_nanos(c.total_ns.load(Ordering::Relaxed)),
                        Duration::from_nanos(c.max_ns.load(Ordering::Relaxed)),
                    )
                })
            })
            .collect()
    }

    /// The report: one header line, then one line per opcode seen, busiest first.
    pub fn table(&self) -> String {
        let mut rows = self.snapshot();
        rows.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
        let total: u64 = rows.iter().map(|r| r.1).sum();
        let mut out = format!(
            "requests: {total} in {:.1} s\n{:<16} {:>10} {:>12} {:>10} {:>10}\n",
            self.since.elapsed().as_secs_f64(),
            "op",
            "count",
            "total_ms",
            "mean_us",
            "max_us"
        );
        for (op, n, sum, max) in rows {
            let _ = writeln!(
                out,
                "{op:<16} {n:>10} {:>12.1} {:>10.1} {:>10.1}",
                sum.as_secs_f64() * 1e3,
                sum.as_secs_f64() * 1e6 / n as f64,
                max.as_secs_f64() * 1e6
            );
        }
        out
    }

    /// Writes the report where `STRATAFS_STATS` said. A file that cannot be written
    /// costs a warning, never the mount.
    pub fn dump(&self) {
        let table = self.table();
        match &self.sink {
            Sink::Log => log::info!("request stats:\n{table}"),
            Sink::File(path) => {
                // Written beside and renamed over, so a reader never sees half a table.
                let mut staged = path.clone().into_os_string();
                staged.push(".tmp");
                let staged = PathBuf::from(staged);
                if let Err(e) =
                    std::fs::write(&staged, &table).and_then(|()| std::fs::rename(&staged, path))
                {
                    log::warn!("request stats: cannot write {}: {e}", path.display());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_totals_and_maxima_per_opcode() {
        let s = RequestStats::new(Sink::Log);
        s.record("lookup", Duration::from_micros(10));
        s.record("lookup", Duration::from_micros(30));
        s.record("getattr", Duration::from_micros(5));
        s.record("no-such-op", Duration::from_micros(1));
        let snap = s.snapshot();
        assert_eq!(
            snap,
            vec![
                (
                    "lookup",
                    2,
                    Duration::from_micros(40),
                    Duration::from_micros(30)
                ),
                (
                    "getattr",
                    1,
                    Duration::from_micros(5),
                    Duration::from_micros(5)
                ),
                (
                    "other",
                    1,
                    Duration::from_micros(1),
                    Duration::from_micros(1)
                ),
            ]
        );
        let table = s.table();
        assert!(table.starts_with("requests: 4 in "), "{table}");
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[2].starts_with("lookup "), "{table}");
        assert!(lines[2].contains(" 20.0 "), "mean of lookups: {table}");
    }

    #[test]
    fn a_file_sink_receives_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats");
        let s = RequestStats::new(Sink::File(path.clone()));
        s.record("mkdir", Duration::from_micros(100));
        s.dump();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("mkdir "), "{text}");
    }
}
