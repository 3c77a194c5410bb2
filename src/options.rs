//! The `-o` option-string parser: fuse-overlayfs / mount(8) syntax in, [`ParsedOptions`] out.
//!
//! Pure (no I/O) and total: every input either parses or yields one [`OptionsError`];
//! nothing here may panic, because the parser is fuzzed and fed from /etc/fstab.
//!
//! # Grammar
//!
//! * One `-o` value is a comma-separated list of items. A `"` toggles quoting: commas
//!   between quotes do not split, and the quote characters themselves are removed.
//!   Consequently a parsed value never contains `"`. Empty items are skipped.
//!   The items of several `-o` values are processed in order, as if joined by commas,
//!   except that a quote never spans two `-o` values.
//! * An item is `key` or `key=value` (split at the first `=`).
//! * Colon-separated path lists (`lowerdir=`, `volume=`, `bind=`) use `\` as an escape:
//!   `\:` is a colon inside a path, `\\` a backslash, `\x` is `x` (as the kernel's
//!   overlayfs does). A lone trailing `\` is kept literally.
//! * Scalar options: the last occurrence wins. `volume=`/`bind=` accumulate.
//! * Unknown items are not errors: each adds one line to [`ParsedOptions::warnings`].
//! * Which keys exist, and whether each takes a value, is [`OPTIONS`]: a key not in it
//!   is unknown before any arm of the parser is tried, and `--help` and the man page
//!   render their `-o` sections from the same table (its tests keep the two in step).
//!
//! Whether an item is known, and what it means, depends only on its unquoted text;
//! [`to_option_string`] relies on that to render an equivalent string such that
//! `parse([to_option_string(&p)]) == Ok(p)` for every `p` that `parse` returned.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{FuseFlags, GraftSource, GraftSpec, IdMapping};

/// The options as written, checked for syntax only: paths are neither resolved nor
/// checked for existence (that is `cli`'s job). `None` means "not given".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOptions {
    /// `lowerdir=`, top-most first. When `Some`, non-empty and no component is empty.
    pub lowerdirs: Option<Vec<PathBuf>>,
    pub upperdir: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
    pub uid_mappings: Option<Vec<IdMapping>>,
    pub gid_mappings: Option<Vec<IdMapping>>,
    /// `squash_to_root` is folded in here as uid=gid=0, so that "last one wins"
    /// holds between it and `squash_to_uid=`/`squash_to_gid=`.
    pub squash_to_uid: Option<u32>,
    pub squash_to_gid: Option<u32>,
    /// Always within 0..=2.
    pub xattr_permissions: Option<u8>,
    pub volatile: bool,
    pub fsync: Option<bool>,
    pub writeback: Option<bool>,
    pub timeout: Option<Duration>,
    pub threaded: Option<bool>,
    pub static_nlink: bool,
    pub noacl: bool,
    pub noxattrs: Option<bool>,
    pub redirect_dir: Option<String>,
    /// `metacopy=on|off` as given (kernel overlayfs syntax).
    pub metacopy: Option<bool>,
    pub xino: Option<String>,
    pub context: Option<String>,
    pub passthrough: Option<bool>,
    /// `io_uring=0|1`: carry requests over FUSE-over-io_uring where the kernel offers it.
    pub io_uring: Option<bool>,
    /// libfuse's `-o debug` (same as `-d`).
    pub debug: bool,
    /// fuse-overlayfs `auto_unmount`: fusermount3 unmounts when the daemon dies.
    pub auto_unmount: bool,
    /// fuse-overlayfs `max_threads=N`: worker threads (N > 0).
    pub max_threads: Option<u32>,
    /// Kernel `userxattr`.
    pub userxattr: bool,
    /// Kernel `index=on|off`.
    pub index: Option<bool>,
    /// fuse-overlayfs `plugins=`, as given (none is loaded).
    pub plugins: Option<String>,
    /// `log=FILE`: the daemon's log goes there (appended) instead of stderr, which a
    /// detached daemon has pointed at /dev/null.
    pub log: Option<PathBuf>,
    pub fuse: FuseFlags,
    /// In the order given; targets are absolute and normalised.
    pub grafts: Vec<GraftSpec>,
    /// Unrecognised items, unquoted, in order. Kept so that rendering preserves them.
    pub unknown: Vec<String>,
    /// One human-readable line per unknown item (`unknown option 'foo' ignored`), and
    /// per option accepted without the effect it has elsewhere.
    pub warnings: Vec<String>,
}

/// A syntax error in an option string. Display is a single line naming the option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("unterminated '\"' in option string \"{}\"", .0.escape_debug())]
    UnterminatedQuote(String),
    #[error("option string contains a NUL byte")]
    NulByte,
    #[error("option '{0}' requires a value")]
    MissingValue(String),
    #[error("option '{0}' takes no value")]
    UnexpectedValue(String),
    #[error("option '{option}': invalid value \"{}\": {reason}", .value.escape_debug())]
    InvalidValue {
        option: String,
        value: String,
        reason: String,
    },
}

fn invalid(option: &str, value: &str, reason: impl Into<String>) -> OptionsError {
    OptionsError::InvalidValue {
        option: option.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Where an option is listed: one section of `--help` and of the man page each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Layers,
    Ownership,
    Behaviour,
    /// FUSE and mount(8) options.
    Mount,
    /// mount(8)/fstab words that are accepted without effect and without a warning.
    Ignored,
}

impl Group {
    /// In the order they are shown.
    pub const ALL: [Group; 5] = [
        Group::Layers,
        Group::Ownership,
        Group::Behaviour,
        Group::Mount,
        Group::Ignored,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Group::Layers => "Layer options (-o)",
            Group::Ownership => "Ownership options (-o)",
            Group::Behaviour => "Behaviour options (-o)",
            Group::Mount => "Mount options (-o)",
            Group::Ignored => "Accepted and ignored (-o)",
        }
    }
}

/// How an option is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `name` alone; `name=...` is refused.
    Flag,
    /// `name=VALUE`, the syntax of VALUE as shown; `name` alone is refused.
    Value(&'static str),
    /// `name` or `name=VALUE`.
    Optional(&'static str),
    /// Every key starting with `name` (less its trailing `*`), with or without a value.
    Prefix,
}

/// One `-o` option: the parser accepts exactly the keys in [`OPTIONS`], and `--help`
/// and the man page list exactly these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionSpec {
    pub name: &'static str,
    pub form: Form,
    /// What it does, in one sentence (wrapped when shown). Empty: shown on one row with
    /// the entry that follows, whose text covers both (`suid, nosuid`).
    pub help: &'static str,
    pub group: Group,
    /// A value that parses (for `Value`/`Optional`): the table's own tests use it.
    pub sample: &'static str,
}

impl OptionSpec {
    /// As written on a command line: `lowerdir=A:B:C`, `noxattrs[=0|1]`, `volatile`.
    pub fn syntax(&self) -> String {
        match self.form {
            Form::Flag | Form::Prefix => self.name.to_string(),
            Form::Value(v) => format!("{}={v}", self.name),
            Form::Optional(v) => format!("{}[={v}]", self.name),
        }
    }

    fn matches(&self, key: &str) -> bool {
        match self.form {
            Form::Prefix => self
                .name
                .strip_suffix('*')
                .is_some_and(|prefix| key.starts_with(prefix)),
            _ => self.name == key,
        }
    }
}

const fn opt(
    name: &'static str,
    form: Form,
    group: Group,
    sample: &'static str,
    help: &'static str,
) -> OptionSpec {
    OptionSpec {
        name,
        form,
        help,
        group,
        sample,
    }
}

const fn flag(name: &'static str, group: Group, help: &'static str) -> OptionSpec {
    opt(name, Form::Flag, group, "", help)
}

const fn ignored(name: &'static str) -> OptionSpec {
    opt(name, Form::Flag, Group::Ignored, "", "")
}

use Form::{Optional, Value};
use Group::{Behaviour, Ignored, Layers, Mount, Ownership};

/// Every `-o` option, in the order `--help` and the man page show them.
#[rustfmt::skip]
pub const OPTIONS: &[OptionSpec] = &[
    opt("lowerdir", Value("A:B:C"), Layers, "/l1:/l\\:2",
        "lower layers, A top-most; '\\:' is a ':' inside a path; A::B (data-only layers) \
         is refused: there are none here"),
    opt("lowerdir+", Value("DIR"), Layers, "/l3",
        "one more lower layer, below those given (kernel syntax; no escaping, repeatable)"),
    opt("datadir+", Value("DIR"), Layers, "/data",
        "refused (kernel syntax for a data-only lower layer; there are none here)"),
    opt("upperdir", Value("DIR"), Layers, "/up",
        "writable layer (without it the mount is read-only)"),
    opt("workdir", Value("DIR"), Layers, "/work",
        "staging directory, same filesystem as upperdir"),
    opt("volume", Value("NAME:/PATH[:ro][:nocopy][:nocreate|:delete]"), Layers, "data:/srv:ro",
        "graft named volume NAME at /PATH (repeatable); nocopy: do not populate an empty \
         volume from the image content under /PATH; a missing volume is created (and said \
         so) unless nocreate; delete: a volume this mount creates is removed when it ends"),
    opt("bind", Value("DIR:/PATH[:ro]"), Layers, "/host:/mnt",
        "graft host directory DIR at /PATH (repeatable)"),
    opt("uidmapping", Value("C:H:N[:C:H:N...]"), Ownership, "0:1000:1:1:100000:65536",
        "ids C..C+N stored in the layers are shown as H..H+N; other stored ids show as \
         65534, chown to others: EINVAL"),
    opt("gidmapping", Value("C:H:N[:C:H:N...]"), Ownership, "0:1000:1",
        "same for groups"),
    flag("squash_to_root", Ownership, "report every file as owned by uid 0 / gid 0"),
    opt("squash_to_uid", Value("N"), Ownership, "1000", "report every file as owned by uid N"),
    opt("squash_to_gid", Value("N"), Ownership, "1000", "report every file as owned by gid N"),
    opt("xattr_permissions", Value("0|1|2"), Ownership, "2",
        "1: keep owners/modes in security.fuseoverlayfs.override_stat, 2: in \
         user.containers.override_stat; 0: use the real ones (either is read, and \
         user.fuseoverlayfs.override_stat too)"),
    flag("volatile", Behaviour, "never sync to disk"),
    opt("fsync", Value("0|1"), Behaviour, "0", "0: fsync/fdatasync requests do nothing"),
    opt("writeback", Value("0|1"), Behaviour, "1",
        "kernel writeback cache (disables passthrough)"),
    opt("passthrough", Value("0|1"), Behaviour, "0",
        "FUSE passthrough for regular files (default 1)"),
    opt("io_uring", Value("0|1"), Behaviour, "1",
        "carry requests over FUSE-over-io_uring where the kernel offers it (module parameter \
         fuse.enable_uring), else over /dev/fuse (default 0)"),
    opt("timeout", Value("S"), Behaviour, "1.5",
        "entry/attribute cache timeout in seconds (may be fractional)"),
    opt("threaded", Value("0|1"), Behaviour, "0", "0: serve requests on a single thread"),
    flag("noacl", Behaviour, "do not support POSIX ACLs"),
    opt("noxattrs", Optional("0|1"), Behaviour, "1", "1 (or alone): no extended attributes"),
    opt("redirect_dir", Value("on|follow|off"), Behaviour, "follow",
        "off: renaming a directory with lower content gives EXDEV; follow: existing \
         redirects work, none is made (nofollow is refused: redirects are always followed)"),
    opt("metacopy", Value("on|off"), Behaviour, "on",
        "on: chmod/chown/utimes of a lower file copy up metadata only (off by default: \
         tools reading the upper dir directly, e.g. fuse-overlayfs or an image diff, would \
         see an empty file)"),
    opt("index", Value("on|off"), Behaviour, "on",
        "accepted (index=off is warned about: hard-link copy-ups always use the index (workdir/#stratafs-index))"),
    flag("userxattr", Behaviour,
        "accepted with a warning (xattrs follow privilege); refused with metacopy=on, as \
         by the kernel"),
    opt("xino", Value("on|off|auto"), Behaviour, "auto", "accepted for compatibility"),
    opt("uuid", Value("on|off|null|auto"), Behaviour, "null", "accepted for compatibility"),
    opt("fast_ino", Value("N"), Behaviour, "1", "accepted for compatibility (fuse-overlayfs)"),
    opt("context", Value("CONTEXT"), Behaviour, "system_u:object_r:container_file_t:s0",
        "accepted for compatibility (SELinux); no label is applied"),
    opt("max_threads", Value("N"), Behaviour, "4", "worker threads (fuse-overlayfs)"),
    flag("auto_unmount", Behaviour,
        "mount through fusermount3, which unmounts if the daemon dies"),
    flag("clone_fd", Behaviour, "accepted: one cloned /dev/fuse fd per worker is the default"),
    opt("plugins", Value("LIST"), Behaviour, "a.so", ""),
    opt("max_write", Value("N"), Behaviour, "131072", ""),
    flag("static_nlink", Behaviour, "accepted with a warning that they have no effect here"),
    flag("ro", Mount, ""),
    flag("rw", Mount, "read-only (as without upperdir) / read-write (the default)"),
    flag("allow_other", Mount, "let every user use the mount"),
    flag("allow_root", Mount, "let the mounting user and root use the mount"),
    flag("default_permissions", Mount, "the kernel checks access against the file modes"),
    flag("suid", Mount, ""),
    flag("nosuid", Mount, "honour / ignore set-user-ID and set-group-ID bits"),
    flag("dev", Mount, ""),
    flag("nodev", Mount, "honour / ignore device files"),
    flag("exec", Mount, ""),
    flag("noexec", Mount, "allow / forbid running programs"),
    flag("atime", Mount, ""),
    flag("noatime", Mount, "update / do not update access times"),
    opt("fsname", Value("NAME"), Mount, "overlay",
        "the source column of /proc/mounts (the type is always fuse.stratafs)"),
    flag("debug", Mount, "as -d, without -f"),
    opt("log", Value("FILE|syslog"), Mount, "/var/log/stratafs.log",
        "append the daemon's log to FILE, or send it to syslog through /dev/log (a \
         detached daemon's stderr is /dev/null; a file named syslog is ./syslog)"),
    ignored("relatime"),
    ignored("norelatime"),
    ignored("strictatime"),
    ignored("nostrictatime"),
    ignored("nodiratime"),
    ignored("diratime"),
    ignored("lazytime"),
    ignored("nolazytime"),
    ignored("async"),
    ignored("silent"),
    ignored("loud"),
    opt("subtype", Value("NAME"), Ignored, "overlay", ""),
    ignored("defaults"),
    ignored("auto"),
    ignored("noauto"),
    opt("user", Optional("NAME"), Ignored, "bob", ""),
    ignored("users"),
    ignored("nouser"),
    ignored("owner"),
    ignored("group"),
    ignored("nofail"),
    ignored("_netdev"),
    opt("x-*", Form::Prefix, Ignored, "x-systemd.requires=/x", ""),
    opt("comment", Optional("TEXT"), Ignored, "systemd.automount", ""),
];

/// The table entry for `key`, if it is an option at all.
pub(crate) fn lookup(key: &str) -> Option<&'static OptionSpec> {
    OPTIONS.iter().find(|o| o.matches(key))
}

/// Column where the meanings start in `--help`, and the width they are wrapped to.
const HELP_COLUMN: usize = 27;
const HELP_WIDTH: usize = 88;

/// Appends `text` word-wrapped to `HELP_WIDTH`, every line indented by `indent`; the
/// first line continues `out`'s last line if that is shorter than `indent`.
fn wrap_into(out: &mut String, text: &str, indent: usize) {
    let mut line_len = out.len() - out.rfind('\n').map_or(0, |i| i + 1);
    if line_len >= indent {
        out.push('\n');
        line_len = 0;
    }
    out.push_str(&" ".repeat(indent - line_len));
    line_len = indent;
    let mut first = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if !first && line_len + 1 + word.len() > HELP_WIDTH {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            line_len = indent;
        } else if !first {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += word.len();
        first = false;
    }
    out.push('\n');
}

/// The rows of one group: the options sharing a row (entries with an empty `help`
/// joined to the next one), and that row's text.
pub(crate) fn rows(group: Group) -> Vec<(Vec<&'static OptionSpec>, &'static str)> {
    let mut rows = Vec::new();
    let mut pending = Vec::new();
    for o in OPTIONS.iter().filter(|o| o.group == group) {
        pending.push(o);
        if !o.help.is_empty() {
            rows.push((std::mem::take(&mut pending), o.help));
        }
    }
    if !pending.is_empty() {
        rows.push((pending, ""));
    }
    rows
}

/// The `-o` sections of `stratafs --help`, rendered from [`OPTIONS`]: a heading per
/// group, then one row per option (name and value syntax, then the meaning in an
/// aligned column); the ignored words as one wrapped list.
pub(crate) fn help_text() -> String {
    let mut out = String::new();
    for group in Group::ALL {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(group.title());
        out.push_str(":\n");
        for (opts, help) in rows(group) {
            let names: Vec<String> = opts.iter().map(|o| o.syntax()).collect();
            if help.is_empty() {
                wrap_into(&mut out, &names.join(", "), 2);
                continue;
            }
            let mut names = names.join(", ");
            names.insert_str(0, "  ");
            if names.len() > HELP_WIDTH {
                wrap_into(&mut out, &names, 2);
            } else {
                out.push_str(&names);
            }
            wrap_into(&mut out, help, HELP_COLUMN);
        }
    }
    out
}

/// Parses the `-o` values in command-line order.
pub fn parse<S: AsRef<str>>(opts: &[S]) -> Result<ParsedOptions, OptionsError> {
    let mut parsed = ParsedOptions::default();
    for opt in opts {
        for item in split_items(opt.as_ref())? {
            apply_item(&mut parsed, &item)?;
        }
    }
    warn_not_applied(&mut parsed);
    Ok(parsed)
}

/// Splits one `-o` value into unquoted, non-empty items.
fn split_items(s: &str) -> Result<Vec<String>, OptionsError> {
    if s.contains('\0') {
        return Err(OptionsError::NulByte);
    }
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                if !cur.is_empty() {
                    items.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if quoted {
        return Err(OptionsError::UnterminatedQuote(s.to_string()));
    }
    if !cur.is_empty() {
        items.push(cur);
    }
    Ok(items)
}

/// Applies an option written without a value; false if the key has no such arm (a
/// table entry the parser does not implement: the table's tests catch that).
fn apply_flag(p: &mut ParsedOptions, key: &str) -> bool {
    match key {
        "squash_to_root" => {
            p.squash_to_uid = Some(0);
            p.squash_to_gid = Some(0);
        }
        "volatile" => p.volatile = true,
        "static_nlink" => p.static_nlink = true,
        "auto_unmount" => p.auto_unmount = true,
        // Requests are already read through one cloned /dev/fuse fd per worker thread.
        "clone_fd" => {}
        "userxattr" => p.userxattr = true,
        "noacl" => p.noacl = true,
        // `noxattrs` alone reads naturally as "on".
        "noxattrs" => p.noxattrs = Some(true),
        "debug" => p.debug = true,
        "allow_other" => p.fuse.allow_other = true,
        "allow_root" => p.fuse.allow_root = true,
        "default_permissions" => p.fuse.default_permissions = true,
        "ro" => p.fuse.read_only = true,
        "rw" => p.fuse.read_only = false,
        "suid" => p.fuse.suid = Some(true),
        "nosuid" => p.fuse.suid = Some(false),
        "dev" => p.fuse.dev = Some(true),
        "nodev" => p.fuse.dev = Some(false),
        "exec" => p.fuse.exec = Some(true),
        "noexec" => p.fuse.exec = Some(false),
        "atime" => p.fuse.atime = Some(true),
        "noatime" => p.fuse.atime = Some(false),
        _ => return false,
    }
    true
}

/// Which table entry an item is, whether its form fits the entry, and then its effect.
/// Keys not in [`OPTIONS`] never reach `apply_flag`/`apply_value`, so those two can only
/// accept what the table lists.
fn apply_item(p: &mut ParsedOptions, item: &str) -> Result<(), OptionsError> {
    let (key, value) = match item.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (item, None),
    };
    let Some(spec) = lookup(key) else {
        unknown(p, item);
        return Ok(());
    };
    match (spec.form, value) {
        (Form::Prefix, _) => Ok(()),
        (Form::Flag, Some(_)) => Err(OptionsError::UnexpectedValue(key.to_string())),
        (Form::Value(_), None) => Err(OptionsError::MissingValue(key.to_string())),
        (Form::Flag | Form::Optional(_), None) => {
            // mount(8)/fstab words: accepted, no effect, no warning.
            if spec.group != Group::Ignored && !apply_flag(p, key) {
                unknown(p, item);
            }
            Ok(())
        }
        (Form::Value(_) | Form::Optional(_), Some("")) => Err(match key {
            "lowerdir" => invalid(key, "", "no lower layer given"),
            _ => OptionsError::MissingValue(key.to_string()),
        }),
        (Form::Value(_) | Form::Optional(_), Some(value)) => {
            if spec.group != Group::Ignored {
                apply_value(p, key, value, item)?;
            }
            Ok(())
        }
    }
}

/// Applies `key=value` (value non-empty) for a key the table lists with a value.
fn apply_value(
    p: &mut ParsedOptions,
    key: &str,
    value: &str,
    item: &str,
) -> Result<(), OptionsError> {
    match key {
        "lowerdir" => p.lowerdirs = Some(parse_lowerdir(value)?),
        "upperdir" => p.upperdir = Some(PathBuf::from(value)),
        "workdir" => p.workdir = Some(PathBuf::from(value)),
        "uidmapping" => p.uid_mappings = Some(parse_mappings(key, value)?),
        "gidmapping" => p.gid_mappings = Some(parse_mappings(key, value)?),
        "squash_to_uid" => p.squash_to_uid = Some(parse_u32(key, value)?),
        "squash_to_gid" => p.squash_to_gid = Some(parse_u32(key, value)?),
        "xattr_permissions" => {
            p.xattr_permissions = Some(match value {
                "0" => 0,
                "1" => 1,
                "2" => 2,
                _ => return Err(invalid(key, value, "expected 0, 1 or 2")),
            })
        }
        "fsync" => p.fsync = Some(parse_bool(key, value)?),
        "writeback" => p.writeback = Some(parse_bool(key, value)?),
        "threaded" => p.threaded = Some(parse_bool(key, value)?),
        "noxattrs" => p.noxattrs = Some(parse_bool(key, value)?),
        "passthrough" => p.passthrough = Some(parse_bool(key, value)?),
        "io_uring" => p.io_uring = Some(parse_bool(key, value)?),
        "timeout" => p.timeout = Some(parse_seconds(key, value)?),
        "redirect_dir" => match value {
            "on" | "off" | "follow" => p.redirect_dir = Some(value.to_string()),
            "nofollow" => {
                return Err(invalid(
                    key,
                    value,
                    "not supported: existing redirects are always followed (on, off or follow)",
                ));
            }
            _ => return Err(invalid(key, value, "expected on, follow, nofollow or off")),
        },
        "metacopy" => {
            p.metacopy = Some(match value {
                "on" => true,
                "off" => false,
                _ => return Err(invalid(key, value, "expected on or off")),
            })
        }
        "xino" => match value {
            "on" | "off" | "auto" => p.xino = Some(value.to_string()),
            _ => return Err(invalid(key, value, "expected on, off or auto")),
        },
        "context" => p.context = Some(value.to_string()),
        "volume" => p.grafts.push(parse_volume(value)?),
        "bind" => p.grafts.push(parse_bind(value)?),
        "max_write" => {
            let n = parse_u32(key, value)?;
            if n == 0 {
                return Err(invalid(key, value, "must be positive"));
            }
            p.fuse.max_write = Some(n);
        }
        "fsname" => p.fuse.fsname = Some(value.to_string()),
        "log" => p.log = Some(PathBuf::from(value)),
        "max_threads" => {
            let n = parse_u32(key, value)?;
            if n == 0 {
                return Err(invalid(key, value, "must be positive"));
            }
            p.max_threads = Some(n);
        }
        "plugins" => p.plugins = Some(value.to_string()),
        // Kernel overlayfs: a lower layer given alone, no escaping needed.
        "lowerdir+" => p
            .lowerdirs
            .get_or_insert_with(Vec::new)
            .push(PathBuf::from(value)),
        "datadir+" => return Err(no_data_only_layers(key, value)),
        "index" => match value {
            "on" => p.index = Some(true),
            "off" => p.index = Some(false),
            _ => return Err(invalid(key, value, "expected on or off")),
        },
        "uuid" => match value {
            "on" | "off" | "null" | "auto" => {}
            _ => return Err(invalid(key, value, "expected on, off, null or auto")),
        },
        // Accepted without effect: fuse-overlayfs' inode-number tuning has no analogue
        // here.
        "fast_ino" => {}
        _ => unknown(p, item),
    }
    Ok(())
}

/// One warning per known option that is accepted (so that fstab lines and scripts
/// written for fuse-overlayfs or the kernel mount) but does not do here what it does
/// there. Derived from the final values, after the unknown-option warnings, so that
/// the warnings depend on what was parsed, not on the order it was written in.
fn warn_not_applied(p: &mut ParsedOptions) {
    let notes = [
        (
            p.plugins.is_some(),
            "plugins=",
            "fuse-overlayfs plugins are not supported",
        ),
        (
            p.fuse.max_write.is_some(),
            "max_write=",
            "the kernel's maximum (1 MiB) is negotiated",
        ),
        (
            p.static_nlink,
            "static_nlink",
            "directory link counts are always the real ones",
        ),
        (
            p.index == Some(false),
            "index=off",
            "hard-link copy-ups always use the index (workdir/#stratafs-index)",
        ),
        (
            p.userxattr,
            "userxattr",
            "overlay xattrs are trusted.overlay.* as root and user.overlay.* otherwise; \
             both are read",
        ),
    ];
    for (given, option, why) in notes {
        if given {
            p.warnings
                .push(format!("option '{option}' has no effect: {why}"));
        }
    }
}

fn no_data_only_layers(option: &str, value: &str) -> OptionsError {
    invalid(
        option,
        value,
        "data-only lower layers (datadir+=, lowerdir=A::B) are not supported: the engine \
         has none",
    )
}

fn unknown(p: &mut ParsedOptions, item: &str) {
    p.warnings
        .push(format!("unknown option '{}' ignored", item.escape_debug()));
    p.unknown.push(item.to_string());
}

fn parse_bool(key: &str, value: &str) -> Result<bool, OptionsError> {
    match value {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(invalid(key, value, "expected 0 or 1")),
    }
}

fn parse_u32(key: &str, value: &str) -> Result<u32, OptionsError> {
    // `str::parse` would also accept a leading '+'; plain digits only keeps the
    // accepted language obvious.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(key, value, "not a non-negative integer"));
    }
    value
        .parse::<u32>()
        .map_err(|_| invalid(key, value, "number out of range"))
}

/// `S`, `S.F`, `.F` or `S.`: decimal seconds, parsed exactly to the nanosecond
/// (digits past the ninth decimal are truncated) so that rendering round-trips.
fn parse_seconds(key: &str, value: &str) -> Result<Duration, OptionsError> {
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return Err(invalid(key, value, "expected a number of seconds"));
    }
    let secs = if int.is_empty() {
        0
    } else {
        int.parse::<u64>()
            .map_err(|_| invalid(key, value, "number out of range"))?
    };
    let mut nanos: u32 = 0;
    for i in 0..9 {
        let d = frac.as_bytes().get(i).map_or(0, |b| u32::from(b - b'0'));
        nanos = nanos * 10 + d;
    }
    Ok(Duration::new(secs, nanos))
}

/// `C:H:N[:C:H:N...]`. containers/storage emits a leading `:`, so empty first and
/// last fields are tolerated; an empty field in the middle is a typo and rejected.
fn parse_mappings(key: &str, value: &str) -> Result<Vec<IdMapping>, OptionsError> {
    let trimmed = value.strip_prefix(':').unwrap_or(value);
    let trimmed = trimmed.strip_suffix(':').unwrap_or(trimmed);
    let mut nums = Vec::new();
    for field in trimmed.split(':') {
        nums.push(parse_u32(key, field).map_err(|_| {
            invalid(
                key,
                value,
                format!("\"{}\" is not a valid id", field.escape_debug()),
            )
        })?);
    }
    if nums.len() % 3 != 0 {
        return Err(invalid(key, value, "expected container:host:count triples"));
    }
    let mut out = Vec::new();
    for t in nums.chunks_exact(3) {
        let m = IdMapping {
            container: t[0],
            host: t[1],
            count: t[2],
        };
        if m.count == 0 {
            return Err(invalid(key, value, "a mapping count must be positive"));
        }
        // The last id of each range must still be a u32.
        let limit = 1u64 << 32;
        if u64::from(m.container) + u64::from(m.count) > limit
            || u64::from(m.host) + u64::from(m.count) > limit
        {
            return Err(invalid(
                key,
                value,
                format!(
                    "range {}:{}:{} overflows 32-bit ids",
                    m.container, m.host, m.count
                ),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// Splits a colon list with `\` escapes (see the module docs).
fn split_escaped(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => cur.push('\\'),
            },
            ':' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn escape_colons(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' || c == ':' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn parse_lowerdir(value: &str) -> Result<Vec<PathBuf>, OptionsError> {
    let parts = split_escaped(value);
    // `::` (two unescaped colons: the kernel's separator of data-only layers) is an
    // empty part with a colon on each side; escaped colons never split, so `\:\:`
    // stays two colons inside one path and `\\:` is a backslash before a separator.
    let inner = 1..parts.len().saturating_sub(1);
    if parts
        .iter()
        .enumerate()
        .any(|(i, p)| p.is_empty() && inner.contains(&i))
    {
        return Err(no_data_only_layers("lowerdir", value));
    }
    if parts.iter().any(|p| p.is_empty()) {
        return Err(invalid("lowerdir", value, "empty layer path"));
    }
    Ok(parts.into_iter().map(PathBuf::from).collect())
}

/// Whether `name` is acceptable as a volume name: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most
/// 255 bytes, so it is always a single, non-hidden file name in the state directory.
pub(crate) fn valid_volume_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 255
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Normalises a graft target: absolute, no `.` or empty components, no trailing `/`.
/// `..` is refused rather than resolved, because lexical resolution could disagree
/// with what a symlink in the merged view would make it mean.
pub(crate) fn normalize_target(option: &str, target: &str) -> Result<PathBuf, OptionsError> {
    if !target.starts_with('/') {
        return Err(invalid(option, target, "target path must be absolute"));
    }
    let mut out = PathBuf::from("/");
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(invalid(option, target, "target path must not contain '..'")),
            c => out.push(c),
        }
    }
    if out == Path::new("/") {
        return Err(invalid(option, target, "cannot graft onto '/'"));
    }
    Ok(out)
}

/// The trailing flags of a graft.
#[derive(Default)]
struct GraftFlags {
    read_only: bool,
    nocopy: bool,
    nocreate: bool,
    delete: bool,
}

/// Parses the trailing `:ro`/`:rw`/`:nocopy`/`:nocreate`/`:delete` flags of a graft,
/// in any order; the last three only for volumes.
fn graft_flags(
    option: &str,
    value: &str,
    flags: &[String],
    volume: bool,
) -> Result<GraftFlags, OptionsError> {
    let mut out = GraftFlags::default();
    for f in flags {
        match f.as_str() {
            "ro" => out.read_only = true,
            "rw" => out.read_only = false,
            "nocopy" if volume => out.nocopy = true,
            "nocreate" if volume => out.nocreate = true,
            "delete" if volume => out.delete = true,
            _ => {
                return Err(invalid(
                    option,
                    value,
                    format!("unknown flag \"{}\"", f.escape_debug()),
                ));
            }
        }
    }
    if out.nocreate && out.delete {
        return Err(invalid(
            option,
            value,
            "nocreate and delete exclude each other: :delete removes only a volume the \
             mount creates, and :nocreate never creates one",
        ));
    }
    Ok(out)
}

/// `NAME:/path[:ro][:nocopy][:nocreate|:delete]`, as for `-o volume=` and `--volume`.
pub(crate) fn parse_volume(value: &str) -> Result<GraftSpec, OptionsError> {
    let parts = split_escaped(value);
    let [name, target, flags @ ..] = parts.as_slice() else {
        return Err(invalid(
            "volume",
            value,
            "expected NAME:/path[:ro][:nocopy][:nocreate|:delete]",
        ));
    };
    if !valid_volume_name(name) {
        return Err(invalid(
            "volume",
            value,
            "volume name must match [A-Za-z0-9][A-Za-z0-9_.-]*",
        ));
    }
    let target = normalize_target("volume", target)?;
    let f = graft_flags("volume", value, flags, true)?;
    Ok(GraftSpec {
        source: GraftSource::Volume(name.clone()),
        target,
        read_only: f.read_only,
        nocopy: f.nocopy,
        nocreate: f.nocreate,
        delete: f.delete,
    })
}

/// `/host/dir:/path[:ro]`, as for `-o bind=` and `--bind`.
pub(crate) fn parse_bind(value: &str) -> Result<GraftSpec, OptionsError> {
    let parts = split_escaped(value);
    let [source, target, flags @ ..] = parts.as_slice() else {
        return Err(invalid("bind", value, "expected /host/dir:/path[:ro]"));
    };
    if source.is_empty() {
        return Err(invalid("bind", value, "empty host directory"));
    }
    let target = normalize_target("bind", target)?;
    let f = graft_flags("bind", value, flags, false)?;
    Ok(GraftSpec {
        source: GraftSource::Bind(PathBuf::from(source)),
        target,
        read_only: f.read_only,
        nocopy: false,
        nocreate: false,
        delete: false,
    })
}

/// Renders `p` back into one `-o` value that [`parse`] maps to `p` again.
///
/// Holds for anything `parse` produced. Paths are rendered lossily if they are not
/// UTF-8 (possible only when a caller filled them in from `OsString` arguments).
pub fn to_option_string(p: &ParsedOptions) -> String {
    let mut items: Vec<String> = Vec::new();
    let mut kv = |key: &str, value: &str| items.push(render_item(&format!("{key}={value}")));
    let lossy = |p: &Path| p.to_string_lossy().into_owned();
    let bit = |b: bool| if b { "1" } else { "0" };

    if let Some(l) = &p.lowerdirs {
        let parts: Vec<String> = l.iter().map(|d| escape_colons(&lossy(d))).collect();
        kv("lowerdir", &parts.join(":"));
    }
    if let Some(u) = &p.upperdir {
        kv("upperdir", &lossy(u));
    }
    if let Some(w) = &p.workdir {
        kv("workdir", &lossy(w));
    }
    if let Some(f) = &p.log {
        kv("log", &lossy(f));
    }
    if let Some(n) = p.max_threads {
        kv("max_threads", &n.to_string());
    }
    if let Some(on) = p.index {
        kv("index", if on { "on" } else { "off" });
    }
    if let Some(v) = &p.plugins {
        kv("plugins", v);
    }
    for (key, maps) in [
        ("uidmapping", &p.uid_mappings),
        ("gidmapping", &p.gid_mappings),
    ] {
        if let Some(m) = maps {
            let s: Vec<String> = m
                .iter()
                .map(|m| format!("{}:{}:{}", m.container, m.host, m.count))
                .collect();
            kv(key, &s.join(":"));
        }
    }
    if let Some(u) = p.squash_to_uid {
        kv("squash_to_uid", &u.to_string());
    }
    if let Some(g) = p.squash_to_gid {
        kv("squash_to_gid", &g.to_string());
    }
    if let Some(x) = p.xattr_permissions {
        kv("xattr_permissions", &x.to_string());
    }
    for (key, v) in [
        ("fsync", p.fsync),
        ("writeback", p.writeback),
        ("threaded", p.threaded),
        ("noxattrs", p.noxattrs),
        ("passthrough", p.passthrough),
        ("io_uring", p.io_uring),
    ] {
        if let Some(b) = v {
            kv(key, bit(b));
        }
    }
    if let Some(t) = p.timeout {
        let frac = format!("{:09}", t.subsec_nanos());
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            kv("timeout", &t.as_secs().to_string());
        } else {
            kv("timeout", &format!("{}.{}", t.as_secs(), frac));
        }
    }
    if let Some(on) = p.metacopy {
        kv("metacopy", if on { "on" } else { "off" });
    }
    for (key, v) in [
        ("redirect_dir", &p.redirect_dir),
        ("xino", &p.xino),
        ("context", &p.context),
        ("fsname", &p.fuse.fsname),
    ] {
        if let Some(s) = v {
            kv(key, s);
        }
    }
    if let Some(n) = p.fuse.max_write {
        kv("max_write", &n.to_string());
    }
    for g in &p.grafts {
        let target = escape_colons(&lossy(&g.target));
        let mut v = match &g.source {
            GraftSource::Volume(name) => format!("{}:{target}", escape_colons(name)),
            GraftSource::Bind(src) => format!("{}:{target}", escape_colons(&lossy(src))),
        };
        if g.read_only {
            v.push_str(":ro");
        }
        if g.nocopy {
            v.push_str(":nocopy");
        }
        if g.nocreate {
            v.push_str(":nocreate");
        }
        if g.delete {
            v.push_str(":delete");
        }
        match g.source {
            GraftSource::Volume(_) => kv("volume", &v),
            GraftSource::Bind(_) => kv("bind", &v),
        }
    }

    let f = &p.fuse;
    let flags: [(bool, &str); 9] = [
        (p.auto_unmount, "auto_unmount"),
        (p.userxattr, "userxattr"),
        (p.volatile, "volatile"),
        (p.static_nlink, "static_nlink"),
        (p.noacl, "noacl"),
        (p.debug, "debug"),
        (f.allow_other, "allow_other"),
        (f.allow_root, "allow_root"),
        (f.default_permissions, "default_permissions"),
    ];
    for (on, name) in flags {
        if on {
            items.push(name.to_string());
        }
    }
    if f.read_only {
        items.push("ro".to_string());
    }
    for (v, yes, no) in [
        (f.suid, "suid", "nosuid"),
        (f.dev, "dev", "nodev"),
        (f.exec, "exec", "noexec"),
        (f.atime, "atime", "noatime"),
    ] {
        if let Some(b) = v {
            items.push(if b { yes } else { no }.to_string());
        }
    }
    // Unknown items go last so that they cannot shadow anything; their relative order
    // is kept, which is all that `warnings` records.
    for u in &p.unknown {
        items.push(render_item(u));
    }
    items.join(",")
}

/// Quotes an item if it would otherwise split. Parsed items never contain `"`, so
/// wrapping in quotes is always enough.
fn render_item(item: &str) -> String {
    if item.contains(',') {
        format!("\"{item}\"")
    } else {
        item.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ParsedOptions {
        match parse(&[s]) {
            Ok(p) => p,
            Err(e) => panic!("parse({s:?}) failed: {e}"),
        }
    }

    fn err(s: &str) -> String {
        match parse(&[s]) {
            Ok(p) => panic!("parse({s:?}) unexpectedly succeeded: {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn paths(v: &[&str]) -> Option<Vec<PathBuf>> {
        Some(v.iter().map(PathBuf::from).collect())
    }

    fn roundtrip(o: &ParsedOptions) {
        let s = to_option_string(o);
        assert_eq!(parse(&[&s]).as_ref(), Ok(o), "rendered as {s:?}");
    }

    #[test]
    fn containers_storage_forms() {
        let o = p("lowerdir=G/l/TOP:G/l/BASE,upperdir=G/ID/diff,workdir=G/ID/work,");
        assert_eq!(o.lowerdirs, paths(&["G/l/TOP", "G/l/BASE"]));
        assert_eq!(o.upperdir, Some(PathBuf::from("G/ID/diff")));
        assert_eq!(o.workdir, Some(PathBuf::from("G/ID/work")));
        assert!(o.warnings.is_empty());
        roundtrip(&o);

        let o = p("lowerdir=G/l/TOP:G/l/BASE,upperdir=G/ID/diff,workdir=G/ID/work,,volatile");
        assert!(o.volatile);
        assert_eq!(o.workdir, Some(PathBuf::from("G/ID/work")));
        roundtrip(&o);

        let o = p("uidmapping=:0:1000:1:1:100000:65536,gidmapping=:0:1000:1:1:100000:65536");
        let want = vec![
            IdMapping {
                container: 0,
                host: 1000,
                count: 1,
            },
            IdMapping {
                container: 1,
                host: 100000,
                count: 65536,
            },
        ];
        assert_eq!(o.uid_mappings.as_ref(), Some(&want));
        assert_eq!(o.gid_mappings.as_ref(), Some(&want));
        roundtrip(&o);

        let o = p("lowerdir=/l,context=\"system_u:object_r:container_file_t:s0:c1,c2\",nodev");
        assert_eq!(
            o.context.as_deref(),
            Some("system_u:object_r:container_file_t:s0:c1,c2")
        );
        assert_eq!(o.fuse.dev, Some(false));
        assert!(o.warnings.is_empty());
        roundtrip(&o);

        // The mount(8) helper form.
        let o = p("rw,lowerdir=/a,upperdir=/u,workdir=/w,dev,suid");
        assert!(!o.fuse.read_only);
        assert_eq!((o.fuse.dev, o.fuse.suid), (Some(true), Some(true)));
    }

    #[test]
    fn quoting_and_empty_items() {
        assert_eq!(p(",,,"), ParsedOptions::default());
        assert_eq!(p(""), ParsedOptions::default());
        assert!(p("\"\",volatile").volatile);
        // Quotes may cover the whole item or any part of it.
        assert_eq!(p("\"upperdir=/a,b\"").upperdir, Some(PathBuf::from("/a,b")));
        assert_eq!(p("upperdir=/a\",\"b").upperdir, Some(PathBuf::from("/a,b")));
        assert_eq!(p("lowerdir=\"/a,b\":/c").lowerdirs, paths(&["/a,b", "/c"]));
        let e = err("context=\"abc,volatile");
        assert!(e.contains("unterminated"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn lowerdir_escapes() {
        assert_eq!(p("lowerdir=/a\\:b:/c").lowerdirs, paths(&["/a:b", "/c"]));
        assert_eq!(p("lowerdir=/a\\\\:/c").lowerdirs, paths(&["/a\\", "/c"]));
        assert_eq!(p("lowerdir=/a\\x").lowerdirs, paths(&["/ax"]));
        assert_eq!(p("lowerdir=/a\\").lowerdirs, paths(&["/a\\"]));
        assert_eq!(p("lowerdir=\\:").lowerdirs, paths(&[":"]));
        let o = p("lowerdir=/a\\:b:/c\\\\d:/e\\");
        roundtrip(&o);

        // A layer that is one backslash renders as `:\\:`; the options fuzzer found that
        // this was read back as the data-only separator `::` once escapes were stripped.
        assert_eq!(
            p("lowerdir=/a:\\\\:/b").lowerdirs,
            paths(&["/a", "\\", "/b"])
        );
        roundtrip(&p("lowerdir=/a:\\,lowerdir+=/b"));
        assert!(err("lowerdir=/a:\\\\::/b").contains("data-only"));
        assert!(err("lowerdir=/a\\:::/b").contains("data-only"));
        assert_eq!(p("lowerdir=/a\\:\\:/b").lowerdirs, paths(&["/a::/b"]));
    }

    #[test]
    fn lowerdir_errors() {
        for bad in [
            "lowerdir=",
            "lowerdir=:",
            "lowerdir=/a:",
            "lowerdir=:/a",
            "lowerdir=/a::/b",
        ] {
            let e = err(bad);
            assert!(e.contains("lowerdir"), "{bad}: {e}");
        }
        assert_eq!(err("lowerdir"), "option 'lowerdir' requires a value");
    }

    #[test]
    fn later_scalar_wins_and_multiple_o() {
        let o = parse(&["lowerdir=/a,upperdir=/u1", "upperdir=/u2,lowerdir=/b:/c"]).unwrap();
        assert_eq!(o.lowerdirs, paths(&["/b", "/c"]));
        assert_eq!(o.upperdir, Some(PathBuf::from("/u2")));
        let o = p("ro,rw");
        assert!(!o.fuse.read_only);
        let o = p("rw,ro");
        assert!(o.fuse.read_only);
        let o = p("nosuid,suid,exec,noexec");
        assert_eq!((o.fuse.suid, o.fuse.exec), (Some(true), Some(false)));
        // A quote never spans two -o values.
        assert!(parse(&["context=\"a", "b\""]).is_err());
    }

    #[test]
    fn id_mappings() {
        let m = |c, h, n| IdMapping {
            container: c,
            host: h,
            count: n,
        };
        assert_eq!(
            p("uidmapping=0:1000:1").uid_mappings,
            Some(vec![m(0, 1000, 1)])
        );
        assert_eq!(
            p("uidmapping=0:1000:1:").uid_mappings,
            Some(vec![m(0, 1000, 1)])
        );
        assert_eq!(
            p("gidmapping=0:0:4294967295").gid_mappings,
            Some(vec![m(0, 0, u32::MAX)])
        );
        for bad in [
            "uidmapping=0:1000",
            "uidmapping=0:1000:1:2",
            "uidmapping=a:b:c",
            "uidmapping=0::1000:1",
            "uidmapping=0:1000:0",
            "uidmapping=0:4294967296:1",
            "uidmapping=2:0:4294967295",
            "uidmapping=0:4294967295:2",
            "uidmapping=-1:0:1",
            "uidmapping=:",
            "uidmapping=",
        ] {
            let e = err(bad);
            let opt = &bad[..10];
            assert!(e.contains(opt), "{bad}: {e}");
        }
    }

    #[test]
    fn squash() {
        let o = p("squash_to_root");
        assert_eq!((o.squash_to_uid, o.squash_to_gid), (Some(0), Some(0)));
        let o = p("squash_to_root,squash_to_uid=7");
        assert_eq!((o.squash_to_uid, o.squash_to_gid), (Some(7), Some(0)));
        let o = p("squash_to_uid=7,squash_to_gid=8,squash_to_root");
        assert_eq!((o.squash_to_uid, o.squash_to_gid), (Some(0), Some(0)));
        assert!(err("squash_to_uid=x").contains("squash_to_uid"));
        assert!(err("squash_to_gid=+1").contains("squash_to_gid"));
        assert!(err("squash_to_root=1").contains("takes no value"));
    }

    #[test]
    fn numeric_and_bool_options() {
        let o = p("xattr_permissions=2,fsync=0,writeback=1,threaded=0,noxattrs=1,passthrough=0");
        assert_eq!(o.xattr_permissions, Some(2));
        assert_eq!(o.fsync, Some(false));
        assert_eq!(o.writeback, Some(true));
        assert_eq!(o.threaded, Some(false));
        assert_eq!(o.noxattrs, Some(true));
        assert_eq!(o.passthrough, Some(false));
        roundtrip(&o);
        assert_eq!(p("noxattrs").noxattrs, Some(true));
        assert_eq!(p("noxattrs=0").noxattrs, Some(false));
        for (bad, opt) in [
            ("xattr_permissions=3", "xattr_permissions"),
            ("xattr_permissions=x", "xattr_permissions"),
            ("fsync=yes", "fsync"),
            ("writeback=2", "writeback"),
            ("threaded=", "threaded"),
            ("passthrough=on", "passthrough"),
            ("max_write=0", "max_write"),
            ("max_write=4294967296", "max_write"),
            ("fsync", "fsync"),
        ] {
            let e = err(bad);
            assert!(e.contains(&format!("'{opt}'")), "{bad}: {e}");
        }
        assert_eq!(p("max_write=131072").fuse.max_write, Some(131072));
    }

    #[test]
    fn timeout() {
        let t = |s: &str| p(&format!("timeout={s}")).timeout;
        assert_eq!(t("1"), Some(Duration::from_secs(1)));
        assert_eq!(t("0"), Some(Duration::ZERO));
        assert_eq!(t("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(t(".25"), Some(Duration::from_millis(250)));
        assert_eq!(t("2."), Some(Duration::from_secs(2)));
        assert_eq!(t("0.0000000019"), Some(Duration::from_nanos(1)));
        for bad in [
            "",
            ".",
            "-1",
            "1e3",
            "abc",
            "1.2.3",
            "99999999999999999999999",
        ] {
            assert!(parse(&[format!("timeout={bad}")]).is_err(), "{bad}");
        }
        roundtrip(&p("timeout=1000000.000000001"));
        roundtrip(&p("timeout=0.1"));
    }

    #[test]
    fn strings_and_flags() {
        let o = p(
            "redirect_dir=off,xino=auto,fast_ino=1,static_nlink,noacl,volatile,allow_other,\
             allow_root,default_permissions,ro,nosuid,nodev,noexec,noatime,fsname=foo,subtype=x,debug",
        );
        assert_eq!(o.redirect_dir.as_deref(), Some("off"));
        assert_eq!(o.xino.as_deref(), Some("auto"));
        assert!(o.static_nlink && o.noacl && o.volatile && o.debug);
        let f = &o.fuse;
        assert!(f.allow_other && f.allow_root && f.default_permissions && f.read_only);
        assert_eq!(
            (f.suid, f.dev, f.exec, f.atime),
            (Some(false), Some(false), Some(false), Some(false))
        );
        assert_eq!(f.fsname.as_deref(), Some("foo"));
        // static_nlink is accepted, and said to do nothing here.
        assert_eq!(o.warnings.len(), 1, "{:?}", o.warnings);
        assert!(o.warnings[0].contains("'static_nlink' has no effect"));
        roundtrip(&o);
        assert!(err("volatile=1").contains("'volatile' takes no value"));
        assert!(err("ro=0").contains("'ro'"));
        assert!(err("context=").contains("'context' requires a value"));
    }

    #[test]
    fn fstab_words_accepted_silently() {
        let o = p(
            "defaults,auto,noauto,user,users,nouser,nofail,_netdev,x-systemd.requires=/x,\
             x-gvfs-show,comment=systemd.automount,relatime,strictatime,nodiratime,user=bob,async",
        );
        assert_eq!(o, ParsedOptions::default());
    }

    #[test]
    fn unknown_options_warn() {
        let o = p("lowerdir=/l,foo,bar=1,\"baz=a,b\"");
        assert_eq!(
            o.warnings,
            vec![
                "unknown option 'foo' ignored",
                "unknown option 'bar=1' ignored",
                "unknown option 'baz=a,b' ignored",
            ]
        );
        roundtrip(&o);
        // Control characters cannot break the one-line rule.
        let o = p("fo\no");
        assert!(!o.warnings[0].contains('\n'));
    }

    #[test]
    fn grafts() {
        let o = p(
            "volume=data:/var/lib/data:ro:nocopy,bind=/host/dir:/srv//x/./y/:ro,volume=v2:/a:nocreate,volume=tmp:/t:delete",
        );
        assert_eq!(
            o.grafts,
            vec![
                GraftSpec {
                    source: GraftSource::Volume("data".into()),
                    target: "/var/lib/data".into(),
                    read_only: true,
                    nocopy: true,
                    nocreate: false,
                    delete: false,
                },
                GraftSpec {
                    source: GraftSource::Bind("/host/dir".into()),
                    target: "/srv/x/y".into(),
                    read_only: true,
                    nocopy: false,
                    nocreate: false,
                    delete: false,
                },
                GraftSpec {
                    source: GraftSource::Volume("v2".into()),
                    target: "/a".into(),
                    read_only: false,
                    nocopy: false,
                    nocreate: true,
                    delete: false,
                },
                GraftSpec {
                    source: GraftSource::Volume("tmp".into()),
                    target: "/t".into(),
                    read_only: false,
                    nocopy: false,
                    nocreate: false,
                    delete: true,
                },
            ]
        );
        roundtrip(&o);
        let o = p("bind=/h\\:x:/t\\:y:rw,\"bind=/a,b:/c,d\"");
        assert_eq!(o.grafts[0].source, GraftSource::Bind("/h:x".into()));
        assert_eq!(o.grafts[0].target, PathBuf::from("/t:y"));
        assert_eq!(o.grafts[1].target, PathBuf::from("/c,d"));
        roundtrip(&o);
        for bad in [
            "volume=data",
            "volume=:/x",
            "volume=_x:/x",
            "volume=a/b:/x",
            "volume=a:rel",
            "volume=a:/",
            "volume=a:/x/../y",
            "volume=a:/x:bogus",
            "bind=/h",
            "bind=:/x",
            "bind=/h:/x:nocopy",
            "bind=/h:/x:nocreate",
            "bind=/h:/x:delete",
            "volume=a:/x:nocreate:delete",
            "bind=/h:x",
        ] {
            let e = err(bad);
            let opt = bad.split('=').next().unwrap_or("");
            assert!(e.contains(&format!("'{opt}'")), "{bad}: {e}");
        }
        assert!(valid_volume_name("a.b-c_9"));
        assert!(!valid_volume_name(&"a".repeat(256)));
    }

    #[test]
    fn nul_rejected() {
        assert_eq!(err("lowerdir=/a\0b"), "option string contains a NUL byte");
    }

    #[test]
    fn errors_are_single_lines() {
        for bad in [
            "uidmapping=\n",
            "timeout=\n",
            "volume=\n:/x",
            "lowerdir=\"\n",
        ] {
            let e = err(bad);
            assert!(!e.contains('\n'), "{bad:?}: {e}");
        }
    }

    /// A small deterministic fuzzer: parse never panics, and anything that parses
    /// round-trips through `to_option_string`.
    #[test]
    fn roundtrip_random() {
        const FRAGS: &[&str] = &[
            "lowerdir=",
            "upperdir=",
            "workdir=",
            "volume=",
            "bind=",
            "context=",
            "timeout=",
            "uidmapping=",
            "gidmapping=",
            "fsname=",
            "log=",
            "xino=",
            "redirect_dir=",
            "squash_to_uid=",
            "squash_to_root",
            "ro",
            "rw",
            "nosuid",
            "dev",
            "noatime",
            "volatile",
            "noxattrs",
            "noxattrs=",
            "fsync=",
            "max_write=",
            "foo",
            "x-",
            "user=",
            "/",
            "/a",
            "b",
            ":",
            "\\",
            "\"",
            ",",
            "=",
            ".",
            "..",
            "0",
            "1",
            "2",
            "65536",
            "4294967295",
            "ro",
            "nocopy",
            "é",
            " ",
            "\n",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut ok = 0;
        for _ in 0..200_000 {
            let n = (next() % 12) as usize;
            let mut s = String::new();
            for _ in 0..n {
                s.push_str(FRAGS[(next() % FRAGS.len() as u64) as usize]);
            }
            if let Ok(o) = parse(&[&s]) {
                ok += 1;
                let r = to_option_string(&o);
                assert_eq!(parse(&[&r]).as_ref(), Ok(&o), "input {s:?} rendered {r:?}");
            }
        }
        assert!(ok > 1000, "generator too weak: {ok}");
    }

    /// Options the table lists that change nothing in [`ParsedOptions`]: each says so
    /// in its help text, and the test below checks that the list is exact.
    const WITHOUT_EFFECT: &[&str] = &["clone_fd", "uuid", "fast_ino"];

    #[test]
    fn every_table_option_parses_as_its_form_says() {
        let mut names = std::collections::HashSet::new();
        for o in OPTIONS {
            assert!(names.insert(o.name), "{} is listed twice", o.name);
            let item = match o.form {
                Form::Flag => o.name.to_string(),
                Form::Value(_) | Form::Optional(_) => {
                    assert!(!o.sample.is_empty(), "{} has no sample value", o.name);
                    format!("{}={}", o.name, o.sample)
                }
                Form::Prefix => {
                    assert!(o.matches(o.sample.split('=').next().unwrap_or("")));
                    o.sample.to_string()
                }
            };
            if o.name == "datadir+" {
                assert!(err(&item).contains("option 'datadir+'"), "{item}");
                continue;
            }
            let parsed = p(&item);
            assert!(parsed.unknown.is_empty(), "{item}: {:?}", parsed.warnings);
            roundtrip(&parsed);
            // `rw` changes nothing alone, only after `ro`.
            let changed = parsed != ParsedOptions::default()
                || parse(&["ro", item.as_str()]) != parse(&["ro"]);
            match o.group {
                Group::Ignored => assert!(!changed, "{item} is listed as ignored: {parsed:?}"),
                _ => assert_eq!(
                    changed,
                    !WITHOUT_EFFECT.contains(&o.name),
                    "{item}: {parsed:?}"
                ),
            }
            match o.form {
                Form::Flag => {
                    assert!(err(&format!("{}=1", o.name)).contains("takes no value"));
                }
                Form::Value(_) => {
                    assert!(err(o.name).contains("requires a value"), "{}", o.name);
                    assert!(err(&format!("{}=", o.name)).contains(&format!("'{}'", o.name)));
                }
                Form::Optional(_) => {
                    assert!(p(o.name).unknown.is_empty(), "{}", o.name);
                }
                Form::Prefix => {}
            }
        }
        assert_eq!(lookup("upperdr"), None);
        assert!(p("upperdr=x").warnings[0].contains("unknown option 'upperdr=x'"));
    }

    /// The literal keys of the arms of one top-level `match key` in this file's
    /// function `name` (arms at its first indentation level).
    fn arm_keys(name: &str) -> Vec<String> {
        let src = include_str!("options.rs");
        let start = src
            .find(&format!("\nfn {name}("))
            .unwrap_or_else(|| panic!("no fn {name}"));
        let body = &src[start..];
        let body = &body[..body.find("\n}\n").expect("end of fn")];
        let mut keys = Vec::new();
        for line in body.lines() {
            let Some(arm) = line.strip_prefix("        \"") else {
                continue;
            };
            let pattern = &arm[..arm.find(" =>").expect("a match arm on one line")];
            for key in format!("\"{pattern}").split(" | ") {
                keys.push(key.trim_matches('"').to_string());
            }
        }
        keys
    }

    #[test]
    fn every_key_the_parser_matches_is_in_the_table() {
        let flags = arm_keys("apply_flag");
        let values = arm_keys("apply_value");
        assert!(
            flags.len() >= 20 && values.len() >= 30,
            "{flags:?} {values:?}"
        );
        for key in &flags {
            let spec = lookup(key).unwrap_or_else(|| panic!("{key} is not in OPTIONS"));
            assert!(
                matches!(spec.form, Form::Flag | Form::Optional(_)),
                "{key} is matched without a value but listed as {:?}",
                spec.form
            );
        }
        for key in &values {
            let spec = lookup(key).unwrap_or_else(|| panic!("{key} is not in OPTIONS"));
            assert!(
                matches!(spec.form, Form::Value(_) | Form::Optional(_)),
                "{key} is matched with a value but listed as {:?}",
                spec.form
            );
        }
        // And the other way: every option with an effect has its arm.
        for o in OPTIONS.iter().filter(|o| o.group != Group::Ignored) {
            let arm = match o.form {
                Form::Flag => flags.contains(&o.name.to_string()),
                Form::Value(_) => values.contains(&o.name.to_string()),
                Form::Optional(_) => {
                    flags.contains(&o.name.to_string()) && values.contains(&o.name.to_string())
                }
                Form::Prefix => false,
            };
            assert!(arm, "{} has no arm in the parser", o.name);
        }
    }

    #[test]
    fn help_lists_every_option_in_aligned_columns() {
        let help = help_text();
        for o in OPTIONS {
            assert!(help.contains(&o.syntax()), "--help lacks {}", o.syntax());
        }
        for group in Group::ALL {
            assert!(help.contains(&format!("{}:\n", group.title())));
            for (opts, text) in rows(group).into_iter().filter(|(_, t)| !t.is_empty()) {
                let names: Vec<String> = opts.iter().map(|o| o.syntax()).collect();
                let start = format!("  {}", names.join(", "));
                let line = help
                    .lines()
                    .find(|l| l.starts_with(&start))
                    .unwrap_or_else(|| panic!("no row for {start:?}:\n{help}"));
                let first_word = text.split(' ').next().unwrap_or("");
                let meaning = if start.len() < HELP_COLUMN - 1 {
                    line
                } else {
                    // Too wide for the column: the meaning starts on the next line.
                    let mut lines = help.lines().skip_while(|l| *l != line);
                    lines.nth(1).unwrap_or("")
                };
                assert_eq!(
                    meaning.get(HELP_COLUMN..).map(|m| m.split(' ').next()),
                    Some(Some(first_word)),
                    "{start:?} is not aligned:\n{help}"
                );
            }
        }
        for line in help.lines() {
            assert!(
                line.len() <= HELP_WIDTH || !line.trim().contains(' '),
                "{line:?} is too wide"
            );
        }
    }
}
