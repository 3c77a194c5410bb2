//! Request watchdog: every FUSE callback registers itself here for as long as it runs
//! (a [`Guard`] made at its start, dropped when it returns), and one background thread
//! looks at the registry every second. A request still running after the threshold
//! (10 s, or `STRATAFS_WATCHDOG_SECS`) is reported once, with its opcode, inode and the
//! name it concerns: a hung request otherwise shows only as a hung process on the
//! client side, with nothing in the daemon's log saying what it was doing.
//!
//! Invariants: the request path never panics and never blocks on the scanner (the
//! registry is sharded; a scan holds one shard at a time, for microseconds); each
//! request is reported at most once; the scanner thread ends when the [`Watchdog`] is
//! dropped.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::stats::RequestStats;

/// The threshold when `STRATAFS_WATCHDOG_SECS` does not give one.
pub const DEFAULT_THRESHOLD: Duration = Duration::from_secs(10);
/// How often the scanner looks (less when the threshold is shorter than this).
const SCAN_EVERY: Duration = Duration::from_secs(1);

/// What a request concerns: an inode and, for directory operations, an entry name in
/// it; a rename or link also names where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub ino: u64,
    pub name: Option<OsString>,
    pub to: Option<(u64, OsString)>,
}

/// One request that has run longer than the threshold, as handed to the reporter.
#[derive(Clone, Debug)]
pub struct Stuck {
    pub op: &'static str,
    pub target: Target,
    pub running: Duration,
}

impl fmt::Display for Stuck {
    /// `lookup of inode 5 name "x" still running after 10s`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of inode {}", self.op, self.target.ino)?;
        if let Some(n) = &self.target.name {
            write!(f, " name {:?}", n)?;
        }
        if let Some((ino, n)) = &self.target.to {
            write!(f, " to inode {ino} name {:?}", n)?;
        }
        write!(f, " still running after {}s", self.running.as_secs())
    }
}

struct InFlight {
    op: &'static str,
    target: Target,
    started: Instant,
    reported: bool,
}

type Report = Box<dyn Fn(&Stuck) + Send + Sync>;

struct Registry {
    in_flight: DashMap<u64, InFlight>,
    next_id: AtomicU64,
    threshold: Duration,
    report: Report,
}

impl Registry {
    /// Reports every request older than the threshold that was not reported yet. The
    /// reports are made after the shard locks are released, so a slow reporter (a
    /// blocked stderr) delays only the scanner, never a request.
    fn scan(&self, now: Instant) {
        let mut stuck = Vec::new();
        for mut r in self.in_flight.iter_mut() {
            let running = now.saturating_duration_since(r.started);
            if !r.reported && running >= self.threshold {
                r.reported = true;
                stuck.push(Stuck {
                    op: r.op,
                    target: r.target.clone(),
                    running,
                });
            }
        }
        for s in &stuck {
            (self.report)(s);
        }
    }
}

/// The registry of in-flight requests and its scanner thread.
pub struct Watchdog {
    /// `None`: switched off (`STRATAFS_WATCHDOG_SECS=0`, or no thread could be started).
    registry: Option<Arc<Registry>>,
    /// Request accounting, fed by the same guards (see stats.rs).
    stats: Option<Arc<RequestStats>>,
}

/// Registration of one running request; dropping it ends the registration (and
/// counts the request, when accounting is on).
pub struct Guard<'a> {
    registry: Option<&'a Registry>,
    id: u64,
    accounted: Option<(&'a RequestStats, &'static str, Instant)>,
    /// What the request concerns, for the log line of its failure.
    pub op: &'static str,
    pub ino: u64,
    pub name: Option<&'a OsStr>,
    pub to: Option<(u64, &'a OsStr)>,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if let Some((stats, op, started)) = self.accounted {
            stats.record(op, started.elapsed());
        }
        if let Some(reg) = self.registry {
            if let Some((_, r)) = reg.in_flight.remove(&self.id) {
                if r.reported {
                    log::info!(
                        "watchdog: {} of inode {} finished after {:.1}s",
                        r.op,
                        r.target.ino,
                        r.started.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
}

impl Watchdog {
    /// The daemon's watchdog: threshold from `STRATAFS_WATCHDOG_SECS` (seconds, may be
    /// fractional; 0 switches it off; unset or unparsable: 10 s), reports as one
    /// warning line each.
    pub fn from_env() -> Watchdog {
        let threshold = match std::env::var("STRATAFS_WATCHDOG_SECS") {
            Err(_) => Some(DEFAULT_THRESHOLD),
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(0.0) => None,
                Ok(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
                _ => {
                    log::warn!(
                        "STRATAFS_WATCHDOG_SECS={v:?} is not a number of seconds; using {}s",
                        DEFAULT_THRESHOLD.as_secs()
                    );
                    Some(DEFAULT_THRESHOLD)
                }
            },
        };
        match threshold {
            Some(t) => Watchdog::new(t, |s| log::warn!("watchdog: {s}")),
            None => Watchdog {
                registry: None,
                stats: None,
            },
        }
    }

    /// A watchdog reporting each request that runs for `threshold` or longer to
    /// `report`, once. Scans every second, or every `threshold` when that is shorter.
    pub fn new(threshold: Duration, report: impl Fn(&Stuck) + Send + Sync + 'static) -> Self {
        let registry = Arc::new(Registry {
            in_flight: DashMap::new(),
            next_id: AtomicU64::new(0),
            threshold,
            report: Box::new(report),
        });
        let every = SCAN_EVERY.min(threshold).max(Duration::from_millis(1));
        // The thread holds only a weak reference: dropping the Watchdog ends it.
        let weak: Weak<Registry> = Arc::downgrade(&registry);
        let spawned = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    match weak.upgrade() {
                        Some(reg) => reg.scan(Instant::now()),
                        None => return,
                    }
                }
            });
        match spawned {
            Ok(_) => Watchdog {
                registry: Some(registry),
                stats: None,
            },
            Err(e) => {
                log::warn!("watchdog: cannot start its thread ({e}); requests are not watched");
                Watchdog {
                    registry: None,
                    stats: None,
                }
            }
        }
    }

    /// Registers a request on inode `ino` (and entry `name` in it, if it has one).
    pub fn start<'a>(&'a self, op: &'static str, ino: u64, name: Option<&'a OsStr>) -> Guard<'a> {
        self.register(op, ino, name, None)
    }

    /// Registers a request from (`ino`, `name`) to (`to_ino`, `to_name`): rename, link.
    pub fn start_to<'a>(
        &'a self,
        op: &'static str,
        ino: u64,
        name: Option<&'a OsStr>,
        to_ino: u64,
        to_name: &'a OsStr,
    ) -> Guard<'a> {
        self.register(op, ino, name, Some((to_ino, to_name)))
    }

    fn register<'a>(
        &'a self,
        op: &'static str,
        ino: u64,
        name: Option<&'a OsStr>,
        to: Option<(u64, &'a OsStr)>,
    ) -> Guard<'a> {
        let accounted = self.stats.as_deref().map(|s| (s, op, Instant::now()));
        let Some(reg) = self.registry.as_deref() else {
            return Guard {
                registry: None,
                id: 0,
                accounted,
                op,
                ino,
                name,
                to,
            };
        };
        let id = reg.next_id.fetch_add(1, Ordering::Relaxed);
        reg.in_flight.insert(
            id,
            InFlight {
                op,
                target: Target {
                    ino,
                    name: name.map(OsStr::to_os_string),
                    to: to.map(|(i, n)| (i, n.to_os_string())),
                },
                started: Instant::now(),
                reported: false,
            },
        );
        Guard {
            registry: Some(reg),
            id,
            accounted,
            op,
            ino,
            name,
            to,
        }
    }

    /// Counts every request registered from now on in `stats` too.
    pub fn with_stats(mut self, stats: Option<Arc<RequestStats>>) -> Self {
        self.stats = stats;
        self
    }

    /// Requests registered right now.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.registry.as_ref().map_or(0, |r| r.in_flight.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn collecting(threshold: Duration) -> (Watchdog, Arc<Mutex<Vec<Stuck>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let w = Watchdog::new(threshold, move |s| sink.lock().unwrap().push(s.clone()));
        (w, seen)
    }

    #[test]
    fn a_request_held_past_the_threshold_is_reported_once_with_op_inode_and_name() {
        let (w, seen) = collecting(Duration::from_millis(50));
        let g = w.start("lookup", 5, Some(OsStr::new("x")));
        // Many scan periods: a second report of the same request would show here.
        std::thread::sleep(Duration::from_millis(400));
        drop(g);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "reports: {seen:?}");
        let s = &seen[0];
        assert_eq!(s.op, "lookup");
        assert_eq!(
            s.target,
            Target {
                ino: 5,
                name: Some("x".into()),
                to: None
            }
        );
        assert!(s.running >= Duration::from_millis(50), "{:?}", s.running);
        let line = s.to_string();
        assert!(
            line.starts_with("lookup of inode 5 name \"x\" still running after "),
            "{line}"
        );
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn quick_requests_are_not_reported() {
        let (w, seen) = collecting(Duration::from_millis(200));
        let until = Instant::now() + Duration::from_millis(600);
        while Instant::now() < until {
            let _g = w.start("getattr", 1, None);
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            seen.lock().unwrap().is_empty(),
            "{:?}",
            seen.lock().unwrap()
        );
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn only_the_slow_one_of_concurrent_requests_is_reported_and_rename_names_both_ends() {
        let (w, seen) = collecting(Duration::from_millis(100));
        let slow = w.start_to("rename", 7, Some(OsStr::new("a")), 9, OsStr::new("b"));
        for i in 0..50 {
            let _g = w.start("read", i, None);
            std::thread::sleep(Duration::from_millis(4));
        }
        std::thread::sleep(Duration::from_millis(150));
        drop(slow);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            seen[0].to_string().split(" still").next().unwrap(),
            "rename of inode 7 name \"a\" to inode 9 name \"b\""
        );
    }

    #[test]
    fn switched_off_watchdog_registers_nothing() {
        let w = Watchdog {
            registry: None,
            stats: None,
        };
        let _g = w.start("lookup", 1, Some(OsStr::new("y")));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn guards_feed_the_request_stats_also_with_the_watchdog_off() {
        let stats = Arc::new(RequestStats::new(super::super::stats::Sink::Log));
        for w in [
            Watchdog::new(Duration::from_secs(10), |_| {}).with_stats(Some(stats.clone())),
            Watchdog {
                registry: None,
                stats: Some(stats.clone()),
            },
        ] {
            drop(w.start("lookup", 1, Some(OsStr::new("a"))));
            drop(w.start_to("rename", 1, Some(OsStr::new("a")), 2, OsStr::new("b")));
        }
        let counts: Vec<(&str, u64)> = stats.snapshot().iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(counts, vec![("lookup", 2), ("rename", 2)]);
    }
}
