//! `stratafs volume create|ls|inspect|update|rm|prune`: argument parsing into
//! [`VolumeArgs`] and the handlers that run them against the store.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, ColorChoice, value_parser};

use super::store::{Access, CreateSpec, Store, check_name};
use super::{VolumeError, VolumeInfo};

use crate::cli::{CliError, with_help};

/// A parsed `stratafs volume ...` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeArgs {
    /// `--state-dir`; `None`: $STRATAFS_STATE_DIR or the built-in directory.
    pub state_dir: Option<PathBuf>,
    pub command: VolumeCommand,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeCommand {
    /// `name`: `None` makes a random one (and an anonymous volume).
    Create {
        name: Option<String>,
        spec: CreateSpec,
    },
    Ls {
        output: Output,
        filters: Vec<Filter>,
    },
    Inspect {
        names: Vec<String>,
        /// `--format TEMPLATE`: one line per volume instead of a JSON array.
        format: Option<String>,
    },
    /// `update NAME --size S`: a new size limit, also for running mounts.
    Update {
        name: String,
        size_limit: u64,
    },
    Rm {
        names: Vec<String>,
        force: bool,
    },
    Prune {
        force: bool,
        all: bool,
        filters: Vec<Filter>,
    },
}

/// How `volume ls` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Table,
    /// `-q`: names only.
    Quiet,
    /// `--json`: one JSON array.
    JsonArray,
    /// `--format json`: one JSON object per line (docker's form).
    JsonLines,
    /// `--format TEMPLATE`: `{{.Name}}`-style fields, one line per volume.
    Template(String),
}

/// One `--filter KEY=VALUE` of `volume ls` / `volume prune` (docker's keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `label=K` (has the label) or `label=K=V` (has it with that value).
    Label(String, Option<String>),
    /// `name=S`: the name contains S.
    Name(String),
    /// `dangling=true|false`: no mount uses it (or some does).
    Dangling(bool),
}

impl Filter {
    fn parse(text: &str) -> Result<Filter, CliError> {
        let bad = |why: &str| CliError::Invalid(format!("filter {text:?}: {why}"));
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE (label=, name=, dangling=)"))?;
        match key {
            "label" => match value.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok(Filter::Label(k.into(), Some(v.into()))),
                None if !value.is_empty() => Ok(Filter::Label(value.into(), None)),
                _ => Err(bad("empty label key")),
            },
            "name" => Ok(Filter::Name(value.into())),
            "dangling" => match value {
                "true" | "1" => Ok(Filter::Dangling(true)),
                "false" | "0" => Ok(Filter::Dangling(false)),
                _ => Err(bad("dangling= takes true or false")),
            },
            _ => Err(bad("unknown key (label, name or dangling)")),
        }
    }

    fn matches(&self, v: &super::Volume, in_use: bool) -> bool {
        match self {
            Filter::Label(k, want) => match (v.meta.labels.get(k), want) {
                (Some(_), None) => true,
                (Some(have), Some(want)) => have == want,
                (None, _) => false,
            },
            Filter::Name(part) => v.name.contains(part.as_str()),
            Filter::Dangling(d) => *d != in_use,
        }
    }
}

/// Whether `v` passes every filter (docker ANDs different keys; so do we, all keys).
fn passes(filters: &[Filter], v: &super::Volume) -> bool {
    // Reading the claims costs a directory scan: only when a filter asks.
    let in_use = filters.iter().any(|f| matches!(f, Filter::Dangling(_))) && !v.users().is_empty();
    filters.iter().all(|f| f.matches(v, in_use))
}

fn usage(msg: impl Into<String>) -> CliError {
    CliError::usage(msg, "stratafs volume")
}

/// Parses a size as Kubernetes quantities do: `512`, `64Ki`, `10Mi`, `1.5Gi` (powers
/// of 1024; `KiB`, `MiB`... too) or `100M`, `1G`, `2T` (powers of 1000; `MB`, `GB`...).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit_l = unit.to_ascii_lowercase();
    let (letter, binary) = match unit_l.strip_suffix('b').unwrap_or(&unit_l) {
        u if u.ends_with('i') => (&u[..u.len() - 1], true),
        u => (u, false),
    };
    let power = match letter {
        "" if !binary => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        _ => {
            return Err(format!(
                "size {text:?}: unknown unit {unit:?} (use Ki, Mi, Gi, Ti for powers of \
                 1024, or K, M, G, T for powers of 1000)"
            ));
        }
    };
    let base: f64 = if binary { 1024.0 } else { 1000.0 };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("size {text:?}: not a number"))?;
    let bytes = value * base.powi(power);
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("size {text:?}: must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// A docker-style random name: 32 hex digits from the kernel's random source.
fn random_name() -> Result<String, CliError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| CliError::Invalid(format!("/dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `stratafs volume` and its subcommands, as part of [`crate::cli::command`].
pub fn command() -> clap::Command {
    let state_dir = Arg::new("state_dir")
        .long("state-dir")
        .value_name("DIR")
        .global(true)
        .value_parser(value_parser!(PathBuf))
        .value_hint(clap::ValueHint::DirPath)
        .help(
            "Volume state directory (default: $STRATAFS_STATE_DIR, else /var/lib/stratafs \
             for root, $XDG_DATA_HOME/stratafs or ~/.local/share/stratafs otherwise)",
        );
    let names = |min: usize| {
        Arg::new("names")
            .value_name("NAME")
            .num_args(min..)
            .action(ArgAction::Append)
            .required(min > 0)
    };
    let sub = |name: &'static str, about: &'static str| {
        with_help(
            clap::Command::new(name)
                .color(ColorChoice::Never)
                .disable_help_flag(true)
                .disable_version_flag(true),
        )
        .about(about)
    };
    sub("volume", "Create, list, inspect, resize and remove named volumes")
        .disable_help_subcommand(true)
        .subcommand_required(true)
        .arg(state_dir)
        .subcommand(
            sub("create", "Create a volume and print its name")
                .arg(
                    Arg::new("name")
                        .value_name("NAME")
                        .help("Volume name; without one a random name is made"),
                )
                .arg(
                    Arg::new("size")
                        .long("size")
                        .value_name("SIZE")
                        .help("Size limit: bytes, Ki/Mi/Gi/Ti (1024-based) or K/M/G/T (1000-based)"),
                )
                .arg(
                    Arg::new("label")
                        .long("label")
                        .value_name("KEY[=VALUE]")
                        .action(ArgAction::Append)
                        .help("Attach a label (repeatable)"),
                )
                .arg(
                    Arg::new("access")
                        .long("access")
                        .value_name("MODE")
                        .help(
                            "Access mode, as Kubernetes': rwo (ReadWriteOnce: one read-write \
                             mount at a time, plus read-only ones), rwop (ReadWriteOncePod: \
                             one mount of any kind), rox (ReadOnlyMany: read-only mounts \
                             only; a read-write one is refused), rwx (ReadWriteMany, the \
                             default: no limit); Kubernetes' names are accepted too",
                        ),
                )
                .arg(
                    Arg::new("exclusive")
                        .long("exclusive")
                        .action(ArgAction::SetTrue)
                        .conflicts_with("access")
                        .help("Same as --access rwo"),
                ),
        )
        .subcommand(
            sub("ls", "List volumes")
                .visible_alias("list")
                .arg(
                    Arg::new("quiet")
                        .short('q')
                        .long("quiet")
                        .action(ArgAction::SetTrue)
                        .help("Print names only"),
                )
                .arg(
                    Arg::new("json")
                        .long("json")
                        .action(ArgAction::SetTrue)
                        .help("Print a JSON array"),
                )
                .arg(format_arg())
                .arg(filter_arg()),
        )
        .subcommand(
            sub("inspect", "Show volumes in detail: one JSON array")
                .arg(names(1))
                .arg(format_arg()),
        )
        .subcommand(
            sub("update", "Change a volume's size limit, also for the mounts using it now")
                .arg(
                    Arg::new("name")
                        .value_name("NAME")
                        .required(true)
                        .help("The volume to change"),
                )
                .arg(
                    Arg::new("size")
                        .long("size")
                        .value_name("SIZE")
                        .required(true)
                        .help(
                            "New size limit (as for create); smaller than the data in the \
                             volume is refused",
                        ),
                ),
        )
        .subcommand(
            sub("rm", "Remove volumes")
                .visible_alias("remove")
                .arg(names(1))
                .arg(
                    Arg::new("force")
                        .short('f')
                        .long("force")
                        .action(ArgAction::SetTrue)
                        .help("Remove even while mounted (those mounts lose the data); a missing name is no error"),
                ),
        )
        .subcommand(
            sub("prune", "Remove unused anonymous volumes (all unused ones with --all), after asking")
                .arg(
                    Arg::new("force")
                        .short('f')
                        .long("force")
                        .action(ArgAction::SetTrue)
                        .help("Do not ask for confirmation"),
                )
                .arg(
                    Arg::new("all")
                        .short('a')
                        .long("all")
                        .action(ArgAction::SetTrue)
                        .help("Named volumes too, not only anonymous ones"),
                )
                .arg(filter_arg()),
        )
}

fn format_arg() -> Arg {
    Arg::new("format").long("format").value_name("FORMAT").help(
        "json, or a template of {{.Name}} {{.Mountpoint}} {{.CreatedAt}} {{.Size}} \
             {{.Used}} {{.Mounts}} {{.Labels}} {{.Access}} {{.Exclusive}} (\\t is a tab)",
    )
}

fn filter_arg() -> Arg {
    Arg::new("filter")
        .long("filter")
        .value_name("KEY=VALUE")
        .action(ArgAction::Append)
        .help("label=K, label=K=V, name=SUBSTRING or dangling=true|false (repeatable)")
}

fn filters(m: &ArgMatches) -> Result<Vec<Filter>, CliError> {
    m.get_many::<String>("filter")
        .into_iter()
        .flatten()
        .map(|f| Filter::parse(f))
        .collect()
}

fn checked_names(m: &ArgMatches) -> Result<Vec<String>, CliError> {
    let names: Vec<String> = m
        .get_many::<String>("names")
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    for n in &names {
        check_name(n).map_err(|e| CliError::Invalid(e.to_string()))?;
    }
    Ok(names)
}

/// Parses the arguments after `volume`.
pub fn parse(args: &[OsString]) -> Result<VolumeArgs, CliError> {
    if args.is_empty() {
        return Err(usage(
            "missing volume command (create, ls, inspect, update, rm, prune)",
        ));
    }
    let cmd = crate::cli::subcommand(&["volume"]).unwrap_or_else(command);
    let m = crate::cli::parse_with(cmd, args)?;
    let state_dir = m.get_one::<PathBuf>("state_dir").cloned();
    let command = match m.subcommand() {
        Some(("create", sm)) => {
            let name = sm.get_one::<String>("name").cloned();
            if let Some(n) = &name {
                check_name(n).map_err(|e| CliError::Invalid(e.to_string()))?;
            }
            let size_limit = match sm.get_one::<String>("size") {
                Some(s) => Some(parse_size(s).map_err(CliError::Invalid)?),
                None => None,
            };
            let mut labels = BTreeMap::new();
            for l in sm.get_many::<String>("label").into_iter().flatten() {
                // docker: `--label k` is the label k with an empty value.
                let (k, v) = l.split_once('=').unwrap_or((l, ""));
                if k.is_empty() {
                    return Err(CliError::Invalid(format!(
                        "label {l:?}: expected KEY[=VALUE] with a non-empty KEY"
                    )));
                }
                labels.insert(k.to_string(), v.to_string());
            }
            VolumeCommand::Create {
                spec: CreateSpec {
                    size_limit,
                    labels,
                    access: match sm.get_one::<String>("access") {
                        Some(a) => Access::parse(a).map_err(CliError::Invalid)?,
                        None if sm.get_flag("exclusive") => Access::Rwo,
                        None => Access::Rwx,
                    },
                    anonymous: name.is_none(),
                },
                name,
            }
        }
        Some(("ls", sm)) => {
            let format = sm.get_one::<String>("format").cloned();
            let output = match (sm.get_flag("quiet"), sm.get_flag("json"), format) {
                (true, false, None) => Output::Quiet,
                (false, true, None) => Output::JsonArray,
                (false, false, Some(f)) if f == "json" => Output::JsonLines,
                (false, false, Some(f)) => Output::Template(check_template(&f)?),
                (false, false, None) => Output::Table,
                _ => {
                    return Err(usage(
                        "volume ls: -q, --json and --format exclude each other",
                    ));
                }
            };
            VolumeCommand::Ls {
                output,
                filters: filters(sm)?,
            }
        }
        Some(("inspect", sm)) => VolumeCommand::Inspect {
            names: checked_names(sm)?,
            format: match sm.get_one::<String>("format") {
                Some(f) if f == "json" => None,
                Some(f) => Some(check_template(f)?),
                None => None,
            },
        },
        Some(("update", sm)) => {
            let name = sm.get_one::<String>("name").cloned().unwrap_or_default();
            check_name(&name).map_err(|e| CliError::Invalid(e.to_string()))?;
            let size = sm.get_one::<String>("size").map_or("", String::as_str);
            VolumeCommand::Update {
                name,
                size_limit: parse_size(size).map_err(CliError::Invalid)?,
            }
        }
        Some(("rm", sm)) => VolumeCommand::Rm {
            names: checked_names(sm)?,
            force: sm.get_flag("force"),
        },
        Some(("prune", sm)) => VolumeCommand::Prune {
            force: sm.get_flag("force"),
            all: sm.get_flag("all"),
            filters: filters(sm)?,
        },
        _ => return Err(usage("unknown volume command")),
    };
    Ok(VolumeArgs { state_dir, command })
}

/// A byte count for people: `10.0MiB`, `512B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// The fields a `--format` template may name, with their value for one volume.
fn template_field(i: &VolumeInfo, field: &str) -> Option<String> {
    Some(match field {
        "Name" => i.name.clone(),
        "Mountpoint" => i.data.display().to_string(),
        "CreatedAt" => i.created.clone(),
        "Size" => i.size_limit.map(human_bytes).unwrap_or_else(|| "-".into()),
        "Used" => human_bytes(i.bytes_used),
        "Mounts" => i.mounts.len().to_string(),
        "Labels" => labels_text(i),
        "Access" => i.access.to_string(),
        "Exclusive" => i.exclusive.to_string(),
        _ => return None,
    })
}

/// Checks that every `{{.Field}}` of `template` is known, so that a typo fails before
/// anything is listed. Returns the template.
fn check_template(template: &str) -> Result<String, CliError> {
    let probe = VolumeInfo {
        name: String::new(),
        data: PathBuf::new(),
        created: String::new(),
        size_limit: None,
        bytes_used: 0,
        labels: BTreeMap::new(),
        access: Access::Rwx,
        exclusive: false,
        anonymous: false,
        mounts: Vec::new(),
    };
    render_template(template, &probe).map(|_| template.to_string())
}

/// `{{.Field}}` replaced by the field's value, `\t` and `\n` by a tab and a newline.
fn render_template(template: &str, i: &VolumeInfo) -> Result<String, CliError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| {
            CliError::Invalid(format!("format {template:?}: '{{{{' without '}}}}'"))
        })?;
        let field = after[..end].trim();
        let name = field.strip_prefix('.').unwrap_or(field);
        let value = template_field(i, name).ok_or_else(|| {
            CliError::Invalid(format!(
                "format {template:?}: unknown field {field:?} (Name, Mountpoint, CreatedAt, \
                 Size, Used, Mounts, Labels, Access, Exclusive)"
            ))
        })?;
        out.push_str(&value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out.replace("\\t", "\t").replace("\\n", "\n"))
}

fn labels_text(i: &VolumeInfo) -> String {
    i.labels
        .iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn table(infos: &[VolumeInfo]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "SIZE LIMIT".to_string(),
        "USED".to_string(),
        "ACCESS".to_string(),
        "MOUNTS".to_string(),
        "CREATED".to_string(),
        "LABELS".to_string(),
    ]];
    for i in infos {
        rows.push([
            i.name.clone(),
            i.size_limit.map(human_bytes).unwrap_or_else(|| "-".into()),
            human_bytes(i.bytes_used),
            i.access.to_string(),
            i.mounts.len().to_string(),
            i.created.clone(),
            labels_text(i),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, VolumeError> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| VolumeError::Invalid(e.to_string()))
}

fn template_lines(infos: &[VolumeInfo], template: &str) -> Result<String, VolumeError> {
    let mut out = String::new();
    for i in infos {
        let line = render_template(template, i).map_err(|e| VolumeError::Invalid(e.to_string()))?;
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

fn list(store: &Store, output: &Output, filters: &[Filter]) -> Result<String, VolumeError> {
    let vols: Vec<_> = store
        .list()?
        .into_iter()
        .filter(|v| passes(filters, v))
        .collect();
    if *output == Output::Quiet {
        return Ok(vols.iter().map(|v| format!("{}\n", v.name)).collect());
    }
    let infos = vols
        .iter()
        .map(|v| v.info())
        .collect::<Result<Vec<_>, _>>()?;
    match output {
        Output::Table => Ok(table(&infos)),
        Output::JsonArray => json(&infos),
        Output::JsonLines => {
            let mut out = String::new();
            for i in &infos {
                out.push_str(
                    &serde_json::to_string(i).map_err(|e| VolumeError::Invalid(e.to_string()))?,
                );
                out.push('\n');
            }
            Ok(out)
        }
        Output::Template(t) => template_lines(&infos, t),
        Output::Quiet => Ok(String::new()),
    }
}

/// Asks on the terminal whether to remove `names`. Without a terminal on stdin
/// nobody can answer: refused (a script that means it says --force).
fn confirm_prune(names: &[String]) -> Result<bool, VolumeError> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(VolumeError::Invalid(
            "volume prune: no terminal to confirm on; use --force to prune without asking".into(),
        ));
    }
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "WARNING! This will remove {} volume(s) and their data: {}\n\
         Are you sure you want to continue? [y/N] ",
        names.len(),
        names.join(", ")
    );
    let _ = err.flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn prune(store: &Store, force: bool, all: bool, filters: &[Filter]) -> Result<String, VolumeError> {
    let wanted = |v: &super::Volume| (all || v.meta.anonymous) && passes(filters, v);
    let candidates: Vec<String> = store
        .list()?
        .into_iter()
        .filter(|v| wanted(v) && v.users().is_empty())
        .map(|v| v.name)
        .collect();
    if candidates.is_empty() {
        let hint = if all {
            ""
        } else {
            " (named volumes are kept without --all)"
        };
        return Ok(format!(
            "Nothing to prune{hint}.\nTotal reclaimed space: 0B (0 bytes)\n"
        ));
    }
    if !force && !confirm_prune(&candidates)? {
        return Ok("Nothing removed.\n".into());
    }
    // Only what was shown (and agreed to), should another volume appear meanwhile.
    let removed = store.prune(&|v| candidates.contains(&v.name) && wanted(v))?;
    let mut out = String::new();
    let mut total = 0u64;
    for (name, freed) in &removed {
        out.push_str(&format!("Deleted: {name} ({})\n", human_bytes(*freed)));
        total += freed;
    }
    out.push_str(&format!(
        "Total reclaimed space: {} ({total} bytes)\n",
        human_bytes(total)
    ));
    Ok(out)
}

/// Runs a volume command; returns the exit status (messages already printed).
pub fn run(args: &VolumeArgs) -> i32 {
    let store = match Store::open(args.state_dir.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stratafs: {e}");
            return 1;
        }
    };
    let mut failed = false;
    let mut report = |r: Result<String, VolumeError>| match r {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!("stratafs: {e}");
            failed = true;
        }
    };
    match &args.command {
        VolumeCommand::Create { name, spec } => {
            let name = match name {
                Some(n) => n.clone(),
                None => match random_name() {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("stratafs: {e}");
                        return 1;
                    }
                },
            };
            report(store.create(&name, spec).map(|v| format!("{}\n", v.name)))
        }
        VolumeCommand::Ls { output, filters } => report(list(&store, output, filters)),
        VolumeCommand::Inspect { names, format } => {
            // One document for all the names: the ones found, in order; each missing
            // one is an error line and a non-zero exit, as docker does.
            let mut infos = Vec::new();
            for n in names {
                match store.get(n).and_then(|v| v.info()) {
                    Ok(i) => infos.push(i),
                    Err(e) => report(Err(e)),
                }
            }
            if !infos.is_empty() || format.is_none() {
                report(match format {
                    Some(t) => template_lines(&infos, t),
                    None => json(&infos),
                });
            }
        }
        VolumeCommand::Update { name, size_limit } => {
            report(store.resize(name, *size_limit).map(|(old, used)| {
                let old = old.map_or("none".to_string(), human_bytes);
                format!(
                    "{name}: size limit {old} -> {} ({} used)\n",
                    human_bytes(*size_limit),
                    human_bytes(used)
                )
            }))
        }
        VolumeCommand::Rm { names, force } => {
            for n in names {
                let users = store.get(n).map(|v| v.users()).unwrap_or_default();
                match store.remove(n, *force) {
                    // docker: `rm -f` of what is not there is no error.
                    Err(VolumeError::NotFound(_)) if *force => {}
                    Ok(_) if !users.is_empty() => {
                        let who: Vec<String> = users.iter().map(|u| u.describe()).collect();
                        eprintln!(
                            "stratafs: warning: volume {n} was in use by {}; its data is \
                             deleted, and at the graft those mounts now see a deleted, empty \
                             directory (new files there fail with ENOENT) until they unmount",
                            who.join(", ")
                        );
                        println!("{n}");
                    }
                    r => report(r.map(|_| format!("{n}\n"))),
                }
            }
        }
        VolumeCommand::Prune {
            force,
            all,
            filters,
        } => report(prune(&store, *force, *all, filters)),
    }
    i32::from(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64Ki"), Ok(64 << 10));
        assert_eq!(parse_size("64K"), Ok(64_000));
        assert_eq!(parse_size("10mi"), Ok(10 << 20));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_size("1G"), Ok(1_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1Ti"), Ok(1 << 40));
        for bad in ["", "0", "x", "10Q", "-1", "1..2M", "5i", "3iB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(10 << 20), "10.0MiB");
    }
}
