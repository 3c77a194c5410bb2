//! Command-line handling: argv -> [`Invocation`], including validation of a mount's
//! layers against the filesystem, so that every configuration error is reported as one
//! line before anything is mounted.
//!
//! One clap definition ([`command`]) describes every form; the parsers below, the
//! per-command help, the man page and the shell completions are all taken from it, so
//! none of them can list a flag another does not know.
//!
//! Only a subcommand name as the *first* argument selects it; anything else is the
//! fuse-overlayfs form (`[-f] [-d] -o OPTS MOUNTPOINT`) or the mount(8) helper form
//! (`SOURCE MOUNTPOINT -o OPTS`, SOURCE ignored). So `stratafs -o ... mount` still
//! mounts on a directory called `mount`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgMatches, ColorChoice, value_parser};

use crate::config::{GraftSource, IdMapping, MountConfig};
use crate::options::{self, OptionsError, ParsedOptions};

/// Where a mount's daemon logs, if not to stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LogTarget {
    /// `log=FILE`, made absolute (the daemon changes directory).
    File(PathBuf),
    /// `log=syslog`: datagrams to /dev/log. A file named `syslog` is `log=./syslog`.
    Syslog,
}

/// What `main` should do.
// Built once per process; boxing the config would only complicate matching.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Mount a validated configuration. `debug` is `-d`, `--debug` or `-o debug`;
    /// `foreground` is `-f` or `-d`.
    Mount {
        config: MountConfig,
        foreground: bool,
        debug: bool,
        /// `-o log=FILE|syslog`.
        log: Option<LogTarget>,
    },
    /// `lazy`: detach a busy mount instead of failing.
    Umount {
        mountpoint: PathBuf,
        lazy: bool,
    },
    Demo,
    /// `stratafs volume ...`.
    Volume(crate::volume::cli::VolumeArgs),
    /// Help, version, man page or completion text for stdout; exit status 0.
    Print(String),
}

/// A parsed command line. `warnings` are kept apart from the outcome so that they are
/// shown even when validation fails afterwards: a misspelt option is usually why a
/// later check fails (`upperdr=` makes `workdir=` look like it lacks an upperdir).
#[derive(Debug)]
pub(crate) struct Invocation {
    /// One line each, without the `stratafs: warning: ` prefix; printed first.
    pub warnings: Vec<String>,
    pub command: Result<Command, CliError>,
}

/// Why the command line was rejected. Display has no `stratafs: ` prefix; it is one
/// line except for [`CliError::Clap`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The argument vector itself is malformed (missing MOUNTPOINT, ...). `help` is
    /// the command whose `--help` explains the form (`stratafs mount`).
    #[error("{message}; try '{help} --help'")]
    Usage { message: String, help: String },
    /// clap's own report of a malformed command line, whole: the problem, its
    /// "similar argument" tip, the usage and the pointer to the command's help.
    #[error("{0}")]
    Clap(String),
    /// The `-o` string (or an equivalent flag) does not parse.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// A path given for `what` (an option name) is unusable.
    #[error("{what} {path:?}: {problem}")]
    Path {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// Any other inconsistent configuration.
    #[error("{0}")]
    Invalid(String),
}

impl CliError {
    /// 2 for malformed command lines (as getopt-style tools do), 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage { .. } | CliError::Clap(_) => 2,
            _ => 1,
        }
    }

    pub(crate) fn usage(message: impl Into<String>, help: &str) -> CliError {
        CliError::Usage {
            message: message.into(),
            help: help.to_string(),
        }
    }
}

/// fuse-overlayfs prints the FUSE library it runs on; `podman info` shows this text.
const FUSE_LIBRARY: &str = "fuser 0.18";

pub(crate) fn version_text() -> String {
    format!(
        "stratafs version {}\nFUSE library version: {FUSE_LIBRARY}\n",
        env!("CARGO_PKG_VERSION")
    )
}

const USAGE: &str = "\
stratafs [-f] [-d] -o OPTIONS [-o OPTIONS...] MOUNTPOINT
       stratafs SOURCE MOUNTPOINT -o OPTIONS      (mount(8)/fstab helper form; SOURCE is ignored)
       stratafs mount --lower DIR [--lower DIR...] [--upper DIR --work DIR]
                      [--volume SPEC...] [--bind SPEC...] [OPTIONS] MOUNTPOINT
       stratafs umount [-l] MOUNTPOINT
       stratafs volume create|ls|inspect|update|rm|prune ...
       stratafs demo
       stratafs help [COMMAND...]
       stratafs completions bash|zsh|fish
       stratafs man";

/// The `-o` options (from the table in `options`), then the quoting rule, the
/// environment and the exit codes: shown after the flags in `stratafs --help`; the man
/// page has each as a section of its own.
pub(crate) fn options_help() -> String {
    format!("{}\n{HELP_TAIL}", options::help_text())
}

/// What follows the `-o` options in `--help`: blocks separated by a blank line, each a
/// heading ending in ':' (a man page section) or a paragraph.
const HELP_TAIL: &str = r#"Quoting: a comma inside double quotes does not split an option
  (context="system_u:object_r:container_file_t:s0:c1,c2").
Unknown options are ignored with a warning, printed before any other error.

Environment:
  STRATAFS_LOG             log filter (env_logger syntax: error, warn, info, debug,
                           trace, or per module: stratafs=debug); default warn, or
                           with -d debug: each request with its path, copy-ups,
                           whiteouts, redirects (STRATAFS_LOG=debug adds fuser's
                           raw request lines)
  STRATAFS_STATE_DIR       volume state directory (as --state-dir)
  FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT  if set, whiteouts are `.wh.NAME` files, never
                           char 0/0 devices (as for fuse-overlayfs)

Exit status:
  0  success (for a mount without -f: the mount is live and the daemon detached)
  1  the command failed (bad path or option value, mount or volume operation refused)
  2  the command line is malformed (unknown flag, missing MOUNTPOINT)
"#;

/// The whole command-line interface. Parsing uses its parts (see the module docs);
/// help, the man page and completions render it.
pub fn command() -> clap::Command {
    let mut cmd = legacy_command()
        .version(env!("CARGO_PKG_VERSION"))
        .about("copy-on-write union filesystem in userspace (overlayfs on-disk format)")
        .override_usage(USAGE)
        .after_help(options_help())
        .subcommand(mount_command())
        .subcommand(
            with_help(base_command("umount"))
                .about("Unmount a stratafs mount (a busy one only with --lazy); returns once its daemon has released its volumes")
                .arg(mountpoint_arg())
                .arg(
                    Arg::new("lazy")
                        .short('l')
                        .long("lazy")
                        .action(ArgAction::SetTrue)
                        .help("Detach a busy mount now; it goes away once no longer in use"),
                ),
        )
        .subcommand(
            with_help(base_command("demo"))
                .about("Mount a two-layer sample image and show a copy-up and a whiteout"),
        )
        .subcommand(crate::volume::cli::command())
        .subcommand(
            with_help(base_command("completions"))
                .about("Print a shell completion script (bash, zsh or fish)")
                .arg(
                    Arg::new("shell")
                        .required(true)
                        .value_parser(["bash", "zsh", "fish"]),
                ),
        )
        .subcommand(with_help(base_command("man")).about("Print the stratafs(1) man page"))
        .subcommand(
            with_help(base_command("help"))
                .about("Print the help of stratafs or of one of its commands")
                .arg(Arg::new("command").num_args(0..).action(ArgAction::Append)),
        );
    // Sets every subcommand's bin_name ("stratafs volume ls") for usage lines.
    cmd.build();
    cmd
}

/// The subcommand `path` (e.g. `["volume", "ls"]`) of [`command`], ready to parse
/// the arguments that follow it; `None` if there is no such command.
pub(crate) fn subcommand(path: &[&str]) -> Option<clap::Command> {
    let mut cmd = command();
    for name in path {
        cmd = cmd.find_subcommand(name)?.clone();
    }
    Some(cmd.no_binary_name(true))
}

/// The first-word subcommands.
const SUBCOMMANDS: [&str; 7] = [
    "mount",
    "umount",
    "demo",
    "volume",
    "completions",
    "man",
    "help",
];

fn is_subcommand(word: &str) -> bool {
    SUBCOMMANDS.contains(&word)
}

/// A mistyped subcommand (`stratafs volum ls`) parses as the mount form's
/// [SOURCE] MOUNTPOINT. Without any -o that form cannot mount, so when its first
/// word is no existing path and is within two edits of a subcommand, the typo is
/// what to report.
fn mistyped_subcommand(args: &[OsString]) -> Option<CliError> {
    let gives_options = args.iter().any(|a| {
        let a = a.as_encoded_bytes();
        a.starts_with(b"-o") || a.starts_with(b"--o")
    });
    let word = args.first()?.to_str()?;
    if gives_options || word.starts_with('-') || std::path::Path::new(word).exists() {
        return None;
    }
    let (distance, meant) = SUBCOMMANDS
        .iter()
        .map(|s| (strsim::levenshtein(word, s), s))
        .min()?;
    if distance > 2 {
        return None;
    }
    Some(CliError::usage(
        format!(
            "unknown command '{word}' (did you mean '{meant}'?); to mount, give -o lowerdir=DIR"
        ),
        "stratafs",
    ))
}

/// The help of the command `words` names (longest known prefix), as `--help` prints it.
fn help_for(words: &[&str]) -> String {
    let mut cmd = command();
    for w in words {
        match cmd.find_subcommand(w) {
            Some(sub) => cmd = sub.clone(),
            None => break,
        }
    }
    cmd.render_help().to_string()
}

/// Parses `args` (including the program name at index 0, as from `std::env::args_os`).
pub(crate) fn parse_args(args: Vec<OsString>) -> Invocation {
    let mut warnings = Vec::new();
    let command = parse_command(args, &mut warnings);
    Invocation { warnings, command }
}

fn parse_command(args: Vec<OsString>, warnings: &mut Vec<String>) -> Result<Command, CliError> {
    let rest = hoist_state_dir(args.into_iter().skip(1).collect());
    let first = rest
        .first()
        .and_then(|a| a.to_str())
        .filter(|a| is_subcommand(a));
    // Help and version win over any other problem on the line, as users expect.
    for a in rest.iter().take_while(|a| *a != "--") {
        if a == "-h" || a == "--help" {
            // The subcommand path: leading words that are not flags (`volume ls`).
            let words: Vec<&str> = match first {
                Some(_) => rest
                    .iter()
                    .map_while(|w| w.to_str().filter(|w| !w.starts_with('-')))
                    .collect(),
                None => Vec::new(),
            };
            return Ok(Command::Print(help_for(&words)));
        }
        if a == "-V" || a == "--version" {
            return Ok(Command::Print(version_text()));
        }
    }
    let Some(first) = first else {
        return legacy_form(&rest, warnings);
    };
    let args = &rest[1..];
    match first {
        "mount" => mount_subcommand(args, warnings),
        "umount" => {
            let m = get_matches(&["umount"], args)?;
            let mountpoint = single_mountpoint(&m);
            Ok(Command::Umount {
                mountpoint,
                lazy: m.get_flag("lazy"),
            })
        }
        "demo" => {
            get_matches(&["demo"], args)?;
            Ok(Command::Demo)
        }
        "completions" => {
            let m = get_matches(&["completions"], args)?;
            let shell = m.get_one::<String>("shell").map(String::as_str);
            Ok(Command::Print(completions(shell.unwrap_or_default())))
        }
        "man" => {
            get_matches(&["man"], args)?;
            Ok(Command::Print(man_page()))
        }
        "help" => {
            let m = get_matches(&["help"], args)?;
            let words: Vec<&str> = m
                .get_many::<String>("command")
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect();
            // An unknown word is a typo worth reporting, not a reason to show other help.
            let mut cmd = command();
            for w in &words {
                cmd = match cmd.find_subcommand(w) {
                    Some(sub) => sub.clone(),
                    None => {
                        return Err(CliError::usage(
                            format!("no such command: {}", words.join(" ")),
                            "stratafs",
                        ));
                    }
                };
            }
            Ok(Command::Print(help_for(&words)))
        }
        _ => crate::volume::cli::parse(args).map(Command::Volume),
    }
}

/// A completion script for `shell` (one of those `completions` accepts).
fn completions(shell: &str) -> String {
    use clap_complete::Shell;
    let shell = match shell {
        "zsh" => Shell::Zsh,
        "fish" => Shell::Fish,
        _ => Shell::Bash,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command(), "stratafs", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Escapes text for a roff paragraph: a leading `.` or `'` would be a request, `\`
/// an escape, `-` a hyphen rather than the minus of a flag.
fn roff_text(s: &str) -> String {
    let mut out = String::new();
    for line in s.lines() {
        let mut l = line.replace('\\', "\\e").replace('-', "\\-");
        if l.starts_with('.') || l.starts_with('\'') {
            l.insert_str(0, "\\&");
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// "Layer options (-o)" -> "LAYER OPTIONS (-o)": man's headings are upper case, the
/// note in parentheses is kept as written.
fn man_heading(title: &str) -> String {
    match title.split_once(" (") {
        Some((words, note)) => format!("{} ({note}", words.to_uppercase()),
        None => title.to_uppercase(),
    }
}

/// stratafs(1): the root command rendered by clap_mangen, the `-o` options,
/// environment and exit status as sections of their own, then every subcommand
/// (recursively) with its usage, description and flags.
pub(crate) fn man_page() -> String {
    let root = command();
    let mut out = Vec::new();
    let man = clap_mangen::Man::new(root.clone()).date("");
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);
    let _ = man.render_synopsis_section(&mut out);
    let _ = man.render_options_section(&mut out);
    let mut text = String::from_utf8_lossy(&out).into_owned();
    // The `-o` options: a section per group of the table, a tagged paragraph per row.
    for group in options::Group::ALL {
        text.push_str(&format!(
            ".SH \"{}\"\n",
            roff_text(&man_heading(group.title())).trim_end()
        ));
        for (opts, help) in options::rows(group) {
            let names: Vec<String> = opts
                .iter()
                .map(|o| format!("\\fB{}\\fR", roff_text(&o.syntax()).trim_end()))
                .collect();
            if help.is_empty() {
                text.push_str(&format!(".PP\n{}\n", names.join(", ")));
            } else {
                text.push_str(&format!(".TP\n{}\n{}", names.join(", "), roff_text(help)));
            }
        }
    }
    // The rest of the help is grouped by headings ending in ':' at column 0; each
    // becomes a section, its lines kept as they are laid out.
    for block in HELP_TAIL.split("\n\n") {
        let (head, body) = block.split_once('\n').unwrap_or((block, ""));
        match head.strip_suffix(':') {
            Some(title) => {
                text.push_str(&format!(
                    ".SH \"{}\"\n.nf\n",
                    roff_text(&man_heading(title)).trim_end()
                ));
                text.push_str(&roff_text(body));
            }
            None => {
                text.push_str(".PP\n.nf\n");
                text.push_str(&roff_text(block));
            }
        }
        text.push_str(".fi\n");
    }
    text.push_str(".SH COMMANDS\n");
    // Depth-first, in the order they are defined: a stack popped from the end.
    let mut subs: Vec<clap::Command> = root.get_subcommands().cloned().collect();
    subs.reverse();
    while let Some(sub) = subs.pop() {
        let children: Vec<clap::Command> = sub.get_subcommands().cloned().collect();
        subs.extend(children.into_iter().rev());
        let name = sub.get_bin_name().unwrap_or(sub.get_name()).to_string();
        text.push_str(&format!(".SS \"{}\"\n", roff_text(&name).trim_end()));
        if let Some(about) = sub.get_about() {
            text.push_str(&format!(".PP\n{}", roff_text(&about.to_string())));
        }
        let usage = sub.clone().render_usage().to_string();
        let usage = usage.trim_start_matches("Usage: ");
        text.push_str(&format!(".PP\n.nf\n{}.fi\n", roff_text(usage)));
        let mut opts = Vec::new();
        let _ = clap_mangen::Man::new(sub.clone()).render_options_section(&mut opts);
        let opts = String::from_utf8_lossy(&opts);
        // Under a subsection, the options need no heading of their own.
        text.push_str(&opts.replacen(".SH OPTIONS\n", "", 1));
    }
    text.push_str(&format!(".SH EXAMPLES\n.nf\n{}.fi\n", roff_text(EXAMPLES)));
    text.push_str(".SH \"SEE ALSO\"\nmount(8), fstab(5), fuse(8), fuse\\-overlayfs(1)\n");
    text
}

const EXAMPLES: &str = "\
# a container-style mount, in the foreground with the resolved configuration logged
stratafs -d -o lowerdir=/img/app:/img/base,upperdir=/c/up,workdir=/c/work /c/merged

# the same as an /etc/fstab line (mount(8) runs stratafs as the fuse.stratafs helper)
stratafs  /c/merged  fuse.stratafs  lowerdir=/img/app:/img/base,upperdir=/c/up,workdir=/c/work  0 0

# a named volume grafted at /var/lib/db, created on first use
stratafs volume create --size 10Gi --label app=db dbdata
stratafs mount --lower /img/base --upper /c/up --work /c/work --volume dbdata:/var/lib/db /c/merged
stratafs volume ls --format '{{.Name}} {{.Size}}'
stratafs umount /c/merged
";

/// `--state-dir DIR` is global: given before a subcommand (`stratafs --state-dir D
/// volume ls`), it is moved behind it, where the subcommand's parser takes it.
fn hoist_state_dir(mut rest: Vec<OsString>) -> Vec<OsString> {
    let width = match rest.first().and_then(|a| a.to_str()) {
        Some("--state-dir") => 2,
        Some(a) if a.starts_with("--state-dir=") => 1,
        _ => return rest,
    };
    let is_sub = rest
        .get(width)
        .is_some_and(|a| a == "volume" || a == "mount");
    if is_sub {
        let flag: Vec<OsString> = rest.drain(..width).collect();
        rest.extend(flag);
    }
    rest
}

fn base_command(name: &'static str) -> clap::Command {
    clap::Command::new(name)
        .color(ColorChoice::Never)
        // -h/-V are answered before parsing (they win over any other problem on the
        // line); declared here so that help, man page and completions list them.
        .disable_help_flag(true)
        .disable_version_flag(true)
        .disable_help_subcommand(true)
        // A flag given twice (e.g. `-f` from both a script and a wrapper) is harmless.
        .args_override_self(true)
}

pub(crate) fn with_help(cmd: clap::Command) -> clap::Command {
    cmd.arg(
        Arg::new("help")
            .short('h')
            .long("help")
            .action(ArgAction::SetTrue)
            .help("Print help"),
    )
    .arg(
        Arg::new("version")
            .short('V')
            .long("version")
            .action(ArgAction::SetTrue)
            .help("Print version"),
    )
}

/// The positional arguments of the fuse-overlayfs form: MOUNTPOINT, or SOURCE
/// MOUNTPOINT as mount(8) passes them; counted after parsing, where the error can say
/// which form was meant.
fn positional_args() -> Arg {
    Arg::new("args")
        .value_name("MOUNTPOINT")
        .action(ArgAction::Append)
        .value_parser(value_parser!(PathBuf))
        .value_hint(clap::ValueHint::DirPath)
        .help("Where to mount (mount(8) passes SOURCE first; it is ignored)")
}

/// The one MOUNTPOINT of `mount` and `umount`.
fn mountpoint_arg() -> Arg {
    Arg::new("mountpoint")
        .value_name("MOUNTPOINT")
        .required(true)
        .value_parser(value_parser!(PathBuf))
        .value_hint(clap::ValueHint::DirPath)
}

/// Flags shared by the fuse-overlayfs form and `stratafs mount`.
fn mount_flags(cmd: clap::Command) -> clap::Command {
    with_help(cmd)
        .arg(
            Arg::new("options")
                .short('o')
                .value_name("OPTIONS")
                .action(ArgAction::Append)
                .value_parser(value_parser!(OsString))
                .help("Comma-separated mount options (below); may be repeated, later values win"),
        )
        .arg(
            Arg::new("foreground")
                .short('f')
                .action(ArgAction::SetTrue)
                .help("Stay in the foreground"),
        )
        .arg(
            Arg::new("debug")
                .short('d')
                .long("debug")
                .action(ArgAction::SetTrue)
                .help("Print the resolved configuration, then log every request (implies -f)"),
        )
        .arg(
            Arg::new("single")
                .short('s')
                .action(ArgAction::SetTrue)
                .help("Serve requests on a single thread (same as -o threaded=0)"),
        )
        .arg(
            Arg::new("state_dir")
                .long("state-dir")
                .value_name("DIR")
                .value_parser(value_parser!(PathBuf))
                .value_hint(clap::ValueHint::DirPath)
                .help("Volume state directory (default: $STRATAFS_STATE_DIR, else built in)"),
        )
}

/// The fuse-overlayfs / mount(8) helper form: the root command without subcommands.
fn legacy_command() -> clap::Command {
    // mount(8) may call a `mount.TYPE` helper with -n (no mtab), -v (verbose) and
    // -t TYPE; none of them changes what we do.
    mount_flags(base_command("stratafs"))
        .arg(positional_args())
        .arg(
            Arg::new("no_mtab")
                .short('n')
                .action(ArgAction::SetTrue)
                .hide(true),
        )
        .arg(
            Arg::new("verbose")
                .short('v')
                .action(ArgAction::SetTrue)
                .hide(true),
        )
        .arg(Arg::new("fstype").short('t').hide(true))
}

fn mount_command() -> clap::Command {
    let path_list = |name: &'static str, help: &'static str| {
        Arg::new(name)
            .long(name)
            .value_name("DIR")
            .action(ArgAction::Append)
            .value_parser(value_parser!(PathBuf))
            .value_hint(clap::ValueHint::DirPath)
            .help(help)
    };
    mount_flags(base_command("mount"))
        .arg(mountpoint_arg())
        .about("Mount layers (and volumes) at MOUNTPOINT, with flags instead of -o")
        .after_help("The -o options are those of `stratafs --help`.")
        .arg(path_list(
            "lower",
            "Lower layer; the first one given is the top-most (repeatable)",
        ))
        .arg(path_list("upper", "Writable upper layer; needs --work"))
        .arg(path_list(
            "work",
            "Work directory on the upper layer's filesystem",
        ))
        .arg(
            Arg::new("volume")
                .long("volume")
                .value_name("SPEC")
                .action(ArgAction::Append)
                .help("NAME:/PATH[:ro][:nocopy][:nocreate|:delete]: same as -o volume=SPEC (repeatable)"),
        )
        .arg(
            Arg::new("bind")
                .long("bind")
                .value_name("SPEC")
                .action(ArgAction::Append)
                .help("DIR:/PATH[:ro]: same as -o bind=SPEC (repeatable)"),
        )
}

/// Parses `args` with the subcommand at `path`. Errors are clap's whole message,
/// pointing at that command's own `--help`.
fn get_matches(path: &[&str], args: &[OsString]) -> Result<ArgMatches, CliError> {
    // The root's subcommands must not be: `-o ... mount` mounts on `./mount`.
    let cmd = match subcommand(path).filter(|_| !path.is_empty()) {
        Some(c) => c,
        None => legacy_command().no_binary_name(true),
    };
    parse_with(cmd, args)
}

pub(crate) fn parse_with(cmd: clap::Command, args: &[OsString]) -> Result<ArgMatches, CliError> {
    let fallback = cmd.get_bin_name().unwrap_or(cmd.get_name()).to_string();
    cmd.try_get_matches_from(args).map_err(|e| {
        let text = e.render().to_string();
        let text = text.strip_prefix("error: ").unwrap_or(&text).trim_end();
        // The command the error is about is the one its usage line shows (`stratafs
        // volume create` for a bad flag of `volume create`): its help is the one to read.
        let help = text
            .lines()
            .find_map(|l| l.strip_prefix("Usage: "))
            .map(|u| {
                u.split(' ')
                    .take_while(|w| !w.starts_with(['[', '<', '-']))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|h| !h.is_empty())
            .unwrap_or(fallback);
        // Without a clap-handled help flag clap does not add this line itself.
        CliError::Clap(format!(
            "{text}\n\nFor more information, try '{help} --help'."
        ))
    })
}

fn single_mountpoint(m: &ArgMatches) -> PathBuf {
    // Required by the definition: clap has refused the line without it.
    m.get_one::<PathBuf>("mountpoint")
        .cloned()
        .unwrap_or_default()
}

fn legacy_form(args: &[OsString], warnings: &mut Vec<String>) -> Result<Command, CliError> {
    if let Some(e) = mistyped_subcommand(args) {
        return Err(e);
    }
    let m = get_matches(&[], args)?;
    let mut pos: Vec<PathBuf> = m
        .get_many::<PathBuf>("args")
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let mountpoint = match pos.len() {
        0 => return Err(CliError::usage("missing MOUNTPOINT", "stratafs")),
        // MOUNTPOINT, or SOURCE MOUNTPOINT from mount(8): the source carries no meaning.
        1 | 2 => pos.pop().unwrap_or_default(),
        _ => {
            return Err(CliError::usage(
                format!(
                    "unexpected argument {:?} (expected [SOURCE] MOUNTPOINT)",
                    pos[2]
                ),
                "stratafs",
            ));
        }
    };
    let opts = parse_o(&m, warnings)?;
    finish_mount(&m, opts, &mountpoint, warnings)
}

fn mount_subcommand(args: &[OsString], warnings: &mut Vec<String>) -> Result<Command, CliError> {
    let m = get_matches(&["mount"], args)?;
    let mountpoint = single_mountpoint(&m);
    let mut opts = parse_o(&m, warnings)?;

    let given = |name: &str| -> Vec<PathBuf> {
        m.get_many::<PathBuf>(name)
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    };
    let lowers = given("lower");
    if !lowers.is_empty() {
        if opts.lowerdirs.is_some() {
            return Err(CliError::Invalid(
                "lower layers given both with --lower and -o lowerdir=".to_string(),
            ));
        }
        opts.lowerdirs = Some(lowers);
    }
    for (flag, option, slot) in [
        ("upper", "upperdir", &mut opts.upperdir),
        ("work", "workdir", &mut opts.workdir),
    ] {
        // Last one wins, as for `-o upperdir=` given twice.
        if let Some(dir) = given(flag).pop() {
            if slot.is_some() {
                return Err(CliError::Invalid(format!(
                    "{option} given both with --{flag} and -o {option}="
                )));
            }
            *slot = Some(dir);
        }
    }
    for spec in m.get_many::<String>("volume").into_iter().flatten() {
        opts.grafts.push(options::parse_volume(spec)?);
    }
    for spec in m.get_many::<String>("bind").into_iter().flatten() {
        opts.grafts.push(options::parse_bind(spec)?);
    }
    finish_mount(&m, opts, &mountpoint, warnings)
}

/// Parses the `-o` values; their warnings go to `warnings` even if a later item fails.
fn parse_o(m: &ArgMatches, warnings: &mut Vec<String>) -> Result<ParsedOptions, CliError> {
    let mut strs = Vec::new();
    for o in m.get_many::<OsString>("options").into_iter().flatten() {
        match o.to_str() {
            Some(s) => strs.push(s),
            None => {
                return Err(CliError::Invalid(format!(
                    "-o {:?}: option string is not valid UTF-8",
                    o
                )));
            }
        }
    }
    let opts = options::parse(&strs)?;
    warnings.extend(opts.warnings.iter().cloned());
    Ok(opts)
}

/// A mount naming a volume that does not exist creates it; a typo would otherwise
/// silently give an empty volume, so that is said (or refused with `:nocreate`). So is
/// a `:delete` that will not apply because the volume exists already.
/// Only messages: the mount itself creates (or refuses) what is still missing then,
/// and decides what `:delete` removes.
fn check_missing_volumes(config: &MountConfig, warnings: &mut Vec<String>) -> Result<(), CliError> {
    let grafts: Vec<(&str, &crate::config::GraftSpec)> = config
        .grafts
        .iter()
        .filter_map(|g| match &g.source {
            GraftSource::Volume(n) => Some((n.as_str(), g)),
            GraftSource::Bind(_) => None,
        })
        .collect();
    if grafts.is_empty() {
        return Ok(());
    }
    // An unusable state directory is the mount's to report, with its own words.
    let Ok(store) = crate::volume::Store::open(config.state_dir.as_deref()) else {
        return Ok(());
    };
    for (name, g) in grafts {
        match store.get(name) {
            Err(crate::volume::VolumeError::NotFound(_)) if g.nocreate => {
                return Err(CliError::Invalid(
                    crate::volume::VolumeError::NoCreate(name.to_string()).to_string(),
                ));
            }
            Err(crate::volume::VolumeError::NotFound(_)) if g.delete => warnings.push(format!(
                "volume {name} does not exist: creating it; it is removed when this mount \
                 ends (:delete)"
            )),
            Err(crate::volume::VolumeError::NotFound(_)) => warnings.push(format!(
                "volume {name} does not exist: creating it (add :nocreate to refuse)"
            )),
            Ok(_) if g.delete => warnings.push(format!(
                "volume {name} exists already: :delete removes only a volume the mount \
                 creates, so it is kept when this mount ends"
            )),
            _ => {}
        }
    }
    Ok(())
}

fn finish_mount(
    m: &ArgMatches,
    opts: ParsedOptions,
    mountpoint: &Path,
    warnings: &mut Vec<String>,
) -> Result<Command, CliError> {
    let mut config = build_config(&opts, mountpoint)?;
    if m.get_flag("single") {
        config.threads = 1;
    }
    // Callers that set this for fuse-overlayfs get the same from us.
    config.aufs_whiteouts = std::env::var_os("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT").is_some();
    config.state_dir = m.get_one::<PathBuf>("state_dir").cloned().or_else(|| {
        std::env::var_os("STRATAFS_STATE_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    check_missing_volumes(&config, warnings)?;
    Ok(Command::Mount {
        config,
        // As in libfuse (and so fuse-overlayfs), `-d` implies `-f`; `-o debug` does not.
        foreground: m.get_flag("foreground") || m.get_flag("debug"),
        debug: m.get_flag("debug") || opts.debug,
        log: match &opts.log {
            Some(f) if f.as_os_str() == "syslog" => Some(LogTarget::Syslog),
            Some(f) => Some(LogTarget::File(std::path::absolute(f).map_err(|e| {
                CliError::Path {
                    what: "log",
                    path: f.clone(),
                    problem: os_reason(&e),
                }
            })?)),
            None => None,
        },
    })
}

/// `io::Error`'s Display appends " (os error N)"; the strerror text alone reads better.
pub(crate) fn os_reason(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Resolves `path` (relative to the current directory, symlinks followed) and checks
/// that it is a directory. Errors name `what` and the path as the user wrote it.
fn existing_dir(what: &'static str, path: &Path) -> Result<PathBuf, CliError> {
    let err = |problem: String| CliError::Path {
        what,
        path: path.to_path_buf(),
        problem,
    };
    if path.as_os_str().is_empty() {
        return Err(err("empty path".to_string()));
    }
    // What a FUSE mount whose daemon died answers; mounting over it again, or using
    // it as a layer, needs it gone first.
    let failed = |e: io::Error| {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            err(format!(
                "{}: a FUSE mount whose daemon has died is still there; unmount it first: \
                 stratafs umount {}",
                os_reason(&e),
                path.display()
            ))
        } else {
            err(os_reason(&e))
        }
    };
    let canonical = fs::canonicalize(path).map_err(failed)?;
    let meta = fs::metadata(&canonical).map_err(failed)?;
    if !meta.is_dir() {
        return Err(err(os_reason(&io::Error::from_raw_os_error(libc::ENOTDIR))));
    }
    Ok(canonical)
}

/// Whether `a` is `b` or lies below it. Canonical paths make this a component-wise
/// prefix test (`/a/bc` is not inside `/a/b`).
fn within(a: &Path, b: &Path) -> bool {
    a.starts_with(b)
}

/// Refuses overlapping container ranges (an id would map two ways) and overlapping
/// host ranges (a file's owner would read back two ways).
fn check_mappings(option: &str, maps: &[IdMapping]) -> Result<(), CliError> {
    for side in [true, false] {
        let mut ranges: Vec<(u64, u64, &IdMapping)> = maps
            .iter()
            .map(|m| {
                let start = u64::from(if side { m.container } else { m.host });
                (start, start + u64::from(m.count), m)
            })
            .collect();
        ranges.sort_by_key(|r| r.0);
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                let (a, b) = (w[0].2, w[1].2);
                return Err(CliError::Invalid(format!(
                    "{option}: {} ranges of {}:{}:{} and {}:{}:{} overlap",
                    if side { "container" } else { "host" },
                    a.container,
                    a.host,
                    a.count,
                    b.container,
                    b.host,
                    b.count
                )));
            }
        }
    }
    Ok(())
}

/// Validates parsed options against the filesystem and builds the mount's configuration.
/// Everything `MountConfig` promises about its fields is established here.
pub(crate) fn build_config(
    opts: &ParsedOptions,
    mountpoint: &Path,
) -> Result<MountConfig, CliError> {
    let lowers = match &opts.lowerdirs {
        Some(l) if !l.is_empty() => l,
        _ => {
            return Err(CliError::Invalid(
                "no lower layer given: -o lowerdir=DIR[:DIR...] (or --lower DIR) is required"
                    .to_string(),
            ));
        }
    };
    let mut lowerdirs = Vec::with_capacity(lowers.len());
    for l in lowers {
        lowerdirs.push(existing_dir("lowerdir", l)?);
    }
    // A layer inside another would show one directory at two places of the merged
    // tree (one directory with two parents, which FUSE cannot serve); kernel
    // overlayfs refuses such layers too.
    for (i, (a, a_given)) in lowerdirs.iter().zip(lowers).enumerate() {
        for (b, b_given) in lowerdirs.iter().zip(lowers).skip(i + 1) {
            if within(a, b) || within(b, a) {
                return Err(CliError::Path {
                    what: "lowerdir",
                    path: a_given.clone(),
                    problem: format!("overlaps lowerdir {b_given:?}: one is inside the other"),
                });
            }
        }
    }

    let (upperdir, workdir) = match (&opts.upperdir, &opts.workdir) {
        (None, None) => (None, None),
        (Some(u), None) => {
            return Err(CliError::Path {
                what: "upperdir",
                path: u.clone(),
                problem: "given without workdir".to_string(),
            });
        }
        (None, Some(w)) => {
            return Err(CliError::Path {
                what: "workdir",
                path: w.clone(),
                problem: "given without upperdir".to_string(),
            });
        }
        (Some(u_given), Some(w_given)) => {
            let u = existing_dir("upperdir", u_given)?;
            let w = existing_dir("workdir", w_given)?;
            let dev = |p: &Path, what, given: &Path| {
                fs::metadata(p)
                    .map(|m| m.dev())
                    .map_err(|e| CliError::Path {
                        what,
                        path: given.to_path_buf(),
                        problem: os_reason(&e),
                    })
            };
            // Copy-up stages files in workdir and renames them into upperdir; rename
            // cannot cross filesystems.
            if dev(&u, "upperdir", u_given)? != dev(&w, "workdir", w_given)? {
                return Err(CliError::Path {
                    what: "workdir",
                    path: w_given.clone(),
                    problem: format!("not on the same filesystem as upperdir {u_given:?}"),
                });
            }
            let nested = |what, path: &PathBuf, other_what: &str, other: &PathBuf| CliError::Path {
                what,
                path: path.clone(),
                problem: format!("must not be inside or the same as {other_what} {other:?}"),
            };
            if within(&w, &u) {
                return Err(nested("workdir", w_given, "upperdir", u_given));
            }
            if within(&u, &w) {
                return Err(nested("upperdir", u_given, "workdir", w_given));
            }
            // Writes through the upper layer must never alter a lower layer, and the
            // merged view must not see its own upper layer as lower content.
            for (l, l_given) in lowerdirs.iter().zip(lowers) {
                for (x, x_given, x_what) in [(&u, u_given, "upperdir"), (&w, w_given, "workdir")] {
                    if within(x, l) {
                        return Err(nested(x_what, x_given, "lowerdir", l_given));
                    }
                    if within(l, x) {
                        return Err(nested("lowerdir", l_given, x_what, x_given));
                    }
                }
            }
            (Some(u), Some(w))
        }
    };

    let mountpoint = existing_dir("mountpoint", mountpoint)?;

    let mut grafts = opts.grafts.clone();
    let mut targets = HashSet::new();
    for g in &mut grafts {
        if let GraftSource::Bind(src) = &g.source {
            g.source = GraftSource::Bind(existing_dir("bind", src)?);
        }
        if !targets.insert(g.target.clone()) {
            return Err(CliError::Invalid(format!(
                "two volumes or binds at {:?}",
                g.target
            )));
        }
    }

    let uid_mappings = opts.uid_mappings.clone().unwrap_or_default();
    let gid_mappings = opts.gid_mappings.clone().unwrap_or_default();
    check_mappings("uidmapping", &uid_mappings)?;
    check_mappings("gidmapping", &gid_mappings)?;

    let xattr_permissions = opts.xattr_permissions.unwrap_or(0);
    if xattr_permissions > 2 {
        return Err(CliError::Invalid(format!(
            "xattr_permissions={xattr_permissions}: expected 0, 1 or 2"
        )));
    }

    // fuser joins mount options with ',' without escaping, so a comma here would be
    // read by fusermount as the start of another option.
    if let Some(name) = &opts.fuse.fsname
        && name.contains(',')
    {
        return Err(CliError::Invalid(format!(
            "fsname {name:?}: must not contain ','"
        )));
    }

    // Refused with the kernel overlayfs' own reasons.
    if opts.metacopy == Some(true) {
        if let Some(r) = opts.redirect_dir.as_deref().filter(|r| *r != "on") {
            return Err(CliError::Invalid(format!(
                "conflicting options: metacopy=on,redirect_dir={r} (a metadata-only copy of \
                 a renamed file is found through a redirect: metacopy needs redirect_dir=on)"
            )));
        }
        if opts.userxattr {
            return Err(CliError::Invalid(
                "conflicting options: userxattr,metacopy=on (metacopy is not safe for \
                 unprivileged mounts)"
                    .to_string(),
            ));
        }
    }

    let writeback = opts.writeback.unwrap_or(false);
    let mut config = MountConfig::new(lowerdirs, mountpoint);
    config.upperdir = upperdir;
    config.workdir = workdir;
    config.uid_mappings = uid_mappings;
    config.gid_mappings = gid_mappings;
    config.squash_to_uid = opts.squash_to_uid;
    config.squash_to_gid = opts.squash_to_gid;
    config.xattr_permissions = xattr_permissions;
    config.volatile = opts.volatile;
    config.fsync = opts.fsync.unwrap_or(true);
    config.writeback = writeback;
    config.timeout = opts.timeout;
    config.threads = match (opts.threaded, opts.max_threads) {
        (Some(false), _) => 1,
        (_, Some(n)) => n as usize,
        _ => 0,
    };
    config.auto_unmount = opts.auto_unmount;
    config.static_nlink = opts.static_nlink;
    config.noacl = opts.noacl;
    config.noxattrs = opts.noxattrs.unwrap_or(false);
    // The kernel's `follow`: existing redirects are followed, none is made. That is
    // what the engine's `off` does (it always follows).
    config.redirect_dir = match opts.redirect_dir.as_deref() {
        Some("follow") => Some("off".to_string()),
        other => other.map(str::to_string),
    };
    config.metacopy = opts.metacopy.unwrap_or(false);
    config.xino = opts.xino.clone();
    config.context = opts.context.clone();
    config.passthrough = opts.passthrough != Some(false) && !writeback;
    // Opt-in: measured against /dev/fuse on this project's benchmark machine it won
    // some metadata rows and lost others within the noise (see scripts/bench,
    // peer stratafs-dev-fuse), so it is not the default yet.
    config.io_uring = opts.io_uring == Some(true);
    config.fuse = opts.fuse.clone();
    config.grafts = grafts;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Dirs {
        _tmp: tempfile::TempDir,
        root: PathBuf,
    }

    impl Dirs {
        fn new() -> Dirs {
            let tmp = tempfile::tempdir().expect("tempdir");
            let root = fs::canonicalize(tmp.path()).expect("canonicalize");
            for d in ["l1", "l2", "u", "w", "mnt", "host"] {
                fs::create_dir(root.join(d)).expect("mkdir");
            }
            fs::write(root.join("file"), b"x").expect("write");
            Dirs { _tmp: tmp, root }
        }
        fn p(&self, rel: &str) -> String {
            self.root.join(rel).to_string_lossy().into_owned()
        }
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        std::iter::once("stratafs")
            .chain(v.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn run(v: &[&str]) -> Result<Command, CliError> {
        parse_args(args(v)).command
    }

    fn mount(v: &[&str]) -> (MountConfig, bool, bool, Vec<String>) {
        let inv = parse_args(args(v));
        match inv.command {
            Ok(Command::Mount {
                config,
                foreground,
                debug,
                ..
            }) => (config, foreground, debug, inv.warnings),
            other => panic!("{v:?}: {other:?}"),
        }
    }

    /// Every error but clap's own report is one line.
    fn fail(v: &[&str]) -> CliError {
        match run(v) {
            Err(e) => {
                if !matches!(e, CliError::Clap(_)) {
                    assert!(!e.to_string().contains('\n'), "{e}");
                }
                e
            }
            Ok(c) => panic!("{v:?} unexpectedly gave {c:?}"),
        }
    }

    #[test]
    fn a_mistyped_subcommand_is_named_with_what_was_meant() {
        for (typo, meant) in [
            (&["volum", "ls"][..], "volume"),
            (&["moutn", "--lower", "x", "m"], "mount"),
            (&["umont", "/nonexistent/m"], "umount"),
            (&["dmeo"], "demo"),
        ] {
            let e = fail(typo);
            assert_eq!(e.exit_code(), 2, "{typo:?}: {e}");
            let text = e.to_string();
            assert!(
                text.contains(&format!("unknown command '{}'", typo[0]))
                    && text.contains(&format!("did you mean '{meant}'")),
                "{typo:?}: {text}"
            );
        }
        // An existing directory is a mountpoint, whatever its name; with -o it mounts.
        let d = Dirs::new();
        let e = fail(&[&d.p("mnt")]);
        assert!(!e.to_string().contains("unknown command"), "{e}");
        let (c, ..) = mount(&[
            "-o",
            &format!("lowerdir={}", d.p("l1")),
            "stratafs",
            &d.p("mnt"),
        ]);
        assert_eq!(c.mountpoint, d.root.join("mnt"));
    }

    #[test]
    fn fuse_overlayfs_form() {
        let d = Dirs::new();
        let o = format!(
            "lowerdir={}:{},upperdir={},workdir={},squash_to_root,threaded=0,writeback=1,foo",
            d.p("l1"),
            d.p("l2"),
            d.p("u"),
            d.p("w")
        );
        let (c, fg, dbg, warnings) = mount(&["-f", "-d", "-o", &o, &d.p("mnt")]);
        assert!(fg && dbg);
        assert_eq!(c.lowerdirs, vec![d.root.join("l1"), d.root.join("l2")]);
        assert_eq!(c.upperdir, Some(d.root.join("u")));
        assert_eq!(c.workdir, Some(d.root.join("w")));
        assert_eq!(c.mountpoint, d.root.join("mnt"));
        assert_eq!((c.squash_to_uid, c.squash_to_gid), (Some(0), Some(0)));
        assert_eq!(c.threads, 1);
        assert!(c.writeback && !c.passthrough);
        assert_eq!(warnings, vec!["unknown option 'foo' ignored"]);

        // Options after the mountpoint, split over several -o.
        let (c, fg, dbg, _) = mount(&[
            &d.p("mnt"),
            "-o",
            &format!("lowerdir={}", d.p("l1")),
            "-o",
            "ro",
        ]);
        assert!(!fg && !dbg);
        let (_, fg, dbg, _) = mount(&["-d", "-o", &format!("lowerdir={}", d.p("l1")), &d.p("mnt")]);
        assert!(fg && dbg, "-d implies -f");
        let (_, fg, dbg, _) = mount(&["-o", &format!("lowerdir={},debug", d.p("l1")), &d.p("mnt")]);
        assert!(!fg && dbg, "-o debug does not");
        assert!(c.fuse.read_only && c.read_only());
        assert_eq!(c.threads, 0);
        assert!(c.passthrough);
    }

    #[test]
    fn mount_helper_form() {
        let d = Dirs::new();
        let o = format!(
            "rw,lowerdir={},upperdir={},workdir={},dev,suid",
            d.p("l1"),
            d.p("u"),
            d.p("w")
        );
        let (c, ..) = mount(&["stratafs", &d.p("mnt"), "-o", &o]);
        assert_eq!(c.mountpoint, d.root.join("mnt"));
        assert_eq!((c.fuse.dev, c.fuse.suid), (Some(true), Some(true)));
        // With the extra flags mount(8) gives a mount.TYPE helper.
        let (c, ..) = mount(&[
            "overlay",
            &d.p("mnt"),
            "-n",
            "-v",
            "-t",
            "fuse.stratafs",
            "-o",
            &o,
        ]);
        assert!(!c.read_only());
        let e = fail(&["a", "b", "c", "-o", &o]);
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn symlinked_layers_resolved() {
        // podman's `l/XYZ` links are relative symlinks; the config must hold the target.
        // (Resolution relative to the working directory is covered by tests/it/cli.rs:
        // changing this process' directory would disturb concurrently running tests.)
        let d = Dirs::new();
        fs::create_dir(d.root.join("l")).expect("mkdir");
        symlink("../l1", d.root.join("l/ABC")).expect("symlink");
        symlink("../u", d.root.join("l/UP")).expect("symlink");
        let o = format!(
            "lowerdir={},upperdir={},workdir={}",
            d.p("l/ABC"),
            d.p("l/UP"),
            d.p("w")
        );
        let (c, ..) = mount(&["-o", &o, &d.p("mnt")]);
        assert_eq!(c.lowerdirs, vec![d.root.join("l1")]);
        assert_eq!(c.upperdir, Some(d.root.join("u")));
    }

    #[test]
    fn mount_subcommand_form() {
        let d = Dirs::new();
        let (c, fg, _, _) = mount(&[
            "mount",
            "--lower",
            &d.p("l1"),
            "--lower",
            &d.p("l2"),
            "--upper",
            &d.p("u"),
            "--work",
            &d.p("w"),
            "--volume",
            "data:/var/data:ro",
            "--bind",
            &format!("{}:/srv", d.p("host")),
            "-o",
            "volume=v2:/x:nocopy",
            "-f",
            "--state-dir",
            "/state",
            &d.p("mnt"),
        ]);
        assert!(fg);
        assert_eq!(c.lowerdirs, vec![d.root.join("l1"), d.root.join("l2")]);
        assert_eq!(c.state_dir, Some(PathBuf::from("/state")));
        assert_eq!(c.grafts.len(), 3);
        assert_eq!(c.grafts[0].source, GraftSource::Volume("v2".into()));
        assert!(c.grafts[0].nocopy);
        assert_eq!(c.grafts[1].target, PathBuf::from("/var/data"));
        assert!(c.grafts[1].read_only);
        assert_eq!(c.grafts[2].source, GraftSource::Bind(d.root.join("host")));

        let e = fail(&[
            "mount",
            "--lower",
            &d.p("l1"),
            "-o",
            &format!("lowerdir={}", d.p("l2")),
            &d.p("mnt"),
        ]);
        assert!(e.to_string().contains("--lower"), "{e}");
        let e = fail(&[
            "mount",
            "--lower",
            &d.p("l1"),
            "--upper",
            &d.p("u"),
            &d.p("mnt"),
        ]);
        assert!(e.to_string().contains("given without workdir"), "{e}");
        let e = fail(&[
            "mount",
            "--lower",
            &d.p("l1"),
            "--volume",
            "bad name:/x",
            &d.p("mnt"),
        ]);
        assert!(e.to_string().contains("'volume'"), "{e}");
        let e = fail(&[
            "mount",
            "--lower",
            &d.p("l1"),
            "--bind",
            &format!("{}:/x", d.p("nope")),
            &d.p("mnt"),
        ]);
        assert!(e.to_string().starts_with("bind \""), "{e}");
        assert!(e.to_string().contains("No such file"), "{e}");
        let e = fail(&["mount", "--lower", &d.p("l1")]);
        assert_eq!(e.exit_code(), 2);
        let e = fail(&["mount", "--lower", &d.p("l1"), &d.p("mnt"), &d.p("mnt")]);
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn other_subcommands() {
        assert_eq!(
            run(&["umount", "/mnt/x"]).ok(),
            Some(Command::Umount {
                mountpoint: "/mnt/x".into(),
                lazy: false,
            })
        );
        assert_eq!(
            run(&["umount", "--lazy", "/mnt/x"]).ok(),
            Some(Command::Umount {
                mountpoint: "/mnt/x".into(),
                lazy: true,
            })
        );
        assert_eq!(run(&["demo"]).ok(), Some(Command::Demo));
        assert_eq!(fail(&["umount"]).exit_code(), 2);
        assert_eq!(fail(&["demo", "x"]).exit_code(), 2);
        assert!(matches!(
            run(&["--state-dir", "/s", "volume", "ls"]),
            Ok(Command::Volume(v)) if v.state_dir.as_deref() == Some(Path::new("/s"))
        ));
        assert_eq!(fail(&["volume"]).exit_code(), 2);
        assert_eq!(fail(&["volume", "frobnicate"]).exit_code(), 2);
        assert_eq!(fail(&["volume", "create", "a/b"]).exit_code(), 1);
        // Not the first word: a mountpoint called "mount" in the fuse-overlayfs form.
        let e = fail(&["-o", "lowerdir=/nonexistent-stratafs", "mount"]);
        assert!(e.to_string().starts_with("lowerdir"), "{e}");
    }

    #[test]
    fn help_and_version() {
        for (a, needle) in [
            (&["-h"][..], "stratafs mount --lower"),
            (&["--help"], "stratafs mount --lower"),
            (&["--bogus", "-h"], "stratafs mount --lower"),
            (&["-o", "x", "--help", "/m"], "stratafs mount --lower"),
            (
                &["mount", "--help"],
                "Usage: stratafs mount [OPTIONS] <MOUNTPOINT>",
            ),
            (&["mount", "--bogus", "-h"], "--lower <DIR>"),
            (&["help", "mount"], "--lower <DIR>"),
            (&["umount", "-h"], "--lazy"),
            (&["volume", "ls", "--help"], "Usage: stratafs volume ls"),
            (
                &["help", "volume", "create"],
                "Usage: stratafs volume create",
            ),
            (&["help"], "stratafs mount --lower"),
        ] {
            match run(a) {
                Ok(Command::Print(t)) => assert!(t.contains(needle), "{a:?}: {t}"),
                other => panic!("{a:?}: {other:?}"),
            }
        }
        for a in [&["-V"][..], &["--version"], &["umount", "-V"]] {
            match run(a) {
                Ok(Command::Print(t)) => {
                    assert!(t.starts_with("stratafs version "), "{t}");
                    assert!(t.contains("FUSE library version: fuser"), "{t}");
                }
                other => panic!("{a:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn usage_errors() {
        for a in [
            &[][..],
            &["-o", "lowerdir=/"],
            &["--bogus", "/m"],
            &["-o"],
            &["-x", "/m"],
        ] {
            let e = fail(a);
            assert_eq!(e.exit_code(), 2, "{a:?}: {e}");
            assert!(e.to_string().contains("try 'stratafs --help'"), "{e}");
        }
        assert!(fail(&["--bogus", "/m"]).to_string().contains("--bogus"));
    }

    #[test]
    fn validation_errors() {
        let d = Dirs::new();
        let (l1, l2, u, w, mnt, file) = (
            d.p("l1"),
            d.p("l2"),
            d.p("u"),
            d.p("w"),
            d.p("mnt"),
            d.p("file"),
        );
        let nope = d.p("nope");
        let check = |o: String, mp: &str, want: String| {
            let e = fail(&["-o", &o, mp]);
            assert_eq!(e.exit_code(), 1, "{o}");
            assert_eq!(e.to_string(), want, "{o}");
        };
        check(
            "upperdir=/u".into(),
            &mnt,
            "no lower layer given: -o lowerdir=DIR[:DIR...] (or --lower DIR) is required".into(),
        );
        check(
            format!("lowerdir={nope}"),
            &mnt,
            format!("lowerdir {nope:?}: No such file or directory"),
        );
        check(
            format!("lowerdir={l1}:{file}"),
            &mnt,
            format!("lowerdir {file:?}: Not a directory"),
        );
        check(
            format!("lowerdir={l1},upperdir={u}"),
            &mnt,
            format!("upperdir {u:?}: given without workdir"),
        );
        check(
            format!("lowerdir={l1},workdir={w}"),
            &mnt,
            format!("workdir {w:?}: given without upperdir"),
        );
        check(
            format!("lowerdir={l1},upperdir={nope},workdir={w}"),
            &mnt,
            format!("upperdir {nope:?}: No such file or directory"),
        );
        check(
            format!("lowerdir={l1},upperdir={u},workdir={file}"),
            &mnt,
            format!("workdir {file:?}: Not a directory"),
        );
        check(
            format!("lowerdir={l1},upperdir={u},workdir={u}"),
            &mnt,
            format!("workdir {u:?}: must not be inside or the same as upperdir {u:?}"),
        );
        let uw = format!("{u}/work");
        fs::create_dir(&uw).expect("mkdir");
        check(
            format!("lowerdir={l1},upperdir={u},workdir={uw}"),
            &mnt,
            format!("workdir {uw:?}: must not be inside or the same as upperdir {u:?}"),
        );
        let wu = format!("{w}/up");
        fs::create_dir(&wu).expect("mkdir");
        check(
            format!("lowerdir={l1},upperdir={wu},workdir={w}"),
            &mnt,
            format!("upperdir {wu:?}: must not be inside or the same as workdir {w:?}"),
        );
        let l1u = format!("{l1}/u");
        fs::create_dir(&l1u).expect("mkdir");
        check(
            format!("lowerdir={l2}:{l1},upperdir={l1u},workdir={w}"),
            &mnt,
            format!("upperdir {l1u:?}: must not be inside or the same as lowerdir {l1:?}"),
        );
        let ul = format!("{u}/lower");
        fs::create_dir(&ul).expect("mkdir");
        check(
            format!("lowerdir={ul},upperdir={u},workdir={w}"),
            &mnt,
            format!("lowerdir {ul:?}: must not be inside or the same as upperdir {u:?}"),
        );
        let l1sub = format!("{l1}/sub");
        fs::create_dir(&l1sub).expect("mkdir");
        check(
            format!("lowerdir={l1sub}:{l1},upperdir={u},workdir={w}"),
            &mnt,
            format!("lowerdir {l1sub:?}: overlaps lowerdir {l1:?}: one is inside the other"),
        );
        check(
            format!("lowerdir={l1}:{l2}:{l1}"),
            &mnt,
            format!("lowerdir {l1:?}: overlaps lowerdir {l1:?}: one is inside the other"),
        );
        // Through a symlink: canonical paths are compared.
        let link = d.p("link-to-l1");
        symlink(&l1, &link).expect("symlink");
        check(
            format!("lowerdir={link},upperdir={l1u},workdir={w}"),
            &mnt,
            format!("upperdir {l1u:?}: must not be inside or the same as lowerdir {link:?}"),
        );
        // Component-wise: l1x is not inside l1.
        let l1x = d.p("l1x");
        fs::create_dir(&l1x).expect("mkdir");
        assert!(
            run(&[
                "-o",
                &format!("lowerdir={l1},upperdir={l1x},workdir={w}"),
                &mnt
            ])
            .is_ok()
        );

        check(
            format!("lowerdir={l1}"),
            &nope,
            format!("mountpoint {nope:?}: No such file or directory"),
        );
        check(
            format!("lowerdir={l1}"),
            &file,
            format!("mountpoint {file:?}: Not a directory"),
        );
        check(
            format!("lowerdir={l1},xattr_permissions=3"),
            &mnt,
            "option 'xattr_permissions': invalid value \"3\": expected 0, 1 or 2".into(),
        );
        check(
            format!("lowerdir={l1},squash_to_uid=abc"),
            &mnt,
            "option 'squash_to_uid': invalid value \"abc\": not a non-negative integer".into(),
        );
        check(
            format!("lowerdir={l1},uidmapping=0:1000:10:5:2000:1"),
            &mnt,
            "uidmapping: container ranges of 0:1000:10 and 5:2000:1 overlap".into(),
        );
        check(
            format!("lowerdir={l1},gidmapping=0:1000:10:20:1005:1"),
            &mnt,
            "gidmapping: host ranges of 0:1000:10 and 20:1005:1 overlap".into(),
        );
        check(
            format!("lowerdir={l1},volume=a:/x,volume=b:/x/"),
            &mnt,
            "two volumes or binds at \"/x\"".into(),
        );
        check(
            format!("lowerdir={l1},\"fsname=a,b\""),
            &mnt,
            "fsname \"a,b\": must not contain ','".into(),
        );
        check(
            format!("lowerdir={l1},bind={file}:/x"),
            &mnt,
            format!("bind {file:?}: Not a directory"),
        );
    }

    #[test]
    fn workdir_on_other_filesystem() {
        // /dev/shm (tmpfs) is normally a different filesystem from the temp directory.
        let d = Dirs::new();
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let (Ok(a), Ok(b)) = (fs::metadata(&d.root), fs::metadata(shm.path())) else {
            return;
        };
        if a.dev() == b.dev() {
            return;
        }
        let w = shm.path().to_string_lossy().into_owned();
        let e = fail(&[
            "-o",
            &format!("lowerdir={},upperdir={},workdir={w}", d.p("l1"), d.p("u")),
            &d.p("mnt"),
        ]);
        assert_eq!(
            e.to_string(),
            format!(
                "workdir {w:?}: not on the same filesystem as upperdir {:?}",
                d.p("u")
            )
        );
    }

    #[test]
    fn option_defaults_map_to_config_defaults() {
        let d = Dirs::new();
        let (c, ..) = mount(&["-o", &format!("lowerdir={}", d.p("l1")), &d.p("mnt")]);
        let want = MountConfig::new(vec![d.root.join("l1")], d.root.join("mnt"));
        // The state directory may come from the environment of whoever runs the tests.
        assert_eq!(
            MountConfig {
                state_dir: None,
                aufs_whiteouts: false,
                ..c
            },
            want
        );
    }

    #[test]
    fn every_option_reaches_config() {
        let d = Dirs::new();
        let o = format!(
            "lowerdir={},uidmapping=0:1000:1,gidmapping=:0:2000:1,squash_to_uid=5,squash_to_gid=6,\
             xattr_permissions=2,volatile,fsync=0,timeout=1.5,static_nlink,noacl,noxattrs=1,\
             redirect_dir=off,xino=on,\"context=a:b:c:s0:c1,c2\",passthrough=0,allow_other,\
             default_permissions,nosuid,nodev,noexec,noatime,max_write=65536,fsname=x",
            d.p("l1")
        );
        let (c, ..) = mount(&["-s", "-o", &o, &d.p("mnt")]);
        assert_eq!(
            c.uid_mappings,
            vec![IdMapping {
                container: 0,
                host: 1000,
                count: 1
            }]
        );
        assert_eq!(
            c.gid_mappings,
            vec![IdMapping {
                container: 0,
                host: 2000,
                count: 1
            }]
        );
        assert_eq!((c.squash_to_uid, c.squash_to_gid), (Some(5), Some(6)));
        assert_eq!(c.xattr_permissions, 2);
        assert!(c.volatile && !c.fsync && !c.syncs());
        assert_eq!(c.timeout, Some(std::time::Duration::from_millis(1500)));
        assert!(c.static_nlink && c.noacl && c.noxattrs && !c.passthrough && !c.writeback);
        assert_eq!(c.redirect_dir.as_deref(), Some("off"));
        assert_eq!(c.xino.as_deref(), Some("on"));
        assert_eq!(c.context.as_deref(), Some("a:b:c:s0:c1,c2"));
        assert!(c.fuse.allow_other && c.fuse.default_permissions);
        assert_eq!(
            (c.fuse.suid, c.fuse.dev, c.fuse.exec, c.fuse.atime),
            (Some(false), Some(false), Some(false), Some(false))
        );
        assert_eq!(c.fuse.max_write, Some(65536));
        assert_eq!(c.fuse.fsname.as_deref(), Some("x"));
        assert_eq!(c.threads, 1);
        assert!(c.read_only());
    }
}
