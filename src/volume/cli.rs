//! `stratafs volume create|ls|inspect|rm|prune`: argument parsing into
//! [`VolumeArgs`] and the handlers that run them against the store.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, ColorChoice, value_parser};

use super::store::{CreateSpec, Store, check_name};
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
    Create { name: String, spec: CreateSpec },
    Ls { json: bool },
    Inspect { names: Vec<String> },
    Rm { names: Vec<String>, force: bool },
    Prune,
}

fn usage(msg: impl Into<String>) -> CliError {
    CliError::usage(msg, "stratafs volume")
}

/// Parses a size such as `512`, `64K`, `10M`, `1.5G`, `2GiB` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "size {text:?}: unknown unit {unit:?} (use K, M, G or T)"
            ));
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("size {text:?}: not a number"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("size {text:?}: must be at least 1 byte"));
    }
    Ok(bytes as u64)
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
    sub("volume", "Create, list, inspect and remove named volumes")
        .disable_help_subcommand(true)
        .subcommand_required(true)
        .arg(state_dir)
        .subcommand(
            sub("create", "Create a volume and print its name")
                .arg(Arg::new("name").value_name("NAME").required(true))
                .arg(
                    Arg::new("size")
                        .long("size")
                        .value_name("SIZE")
                        .help("Size limit: bytes, or with K, M, G, T (powers of 1024)"),
                )
                .arg(
                    Arg::new("label")
                        .long("label")
                        .value_name("KEY=VALUE")
                        .action(ArgAction::Append)
                        .help("Attach a label (repeatable)"),
                )
                .arg(
                    Arg::new("exclusive")
                        .long("exclusive")
                        .action(ArgAction::SetTrue)
                        .help("At most one read-write mount at a time (plus read-only ones)"),
                ),
        )
        .subcommand(
            sub("ls", "List volumes").visible_alias("list").arg(
                Arg::new("json")
                    .long("json")
                    .action(ArgAction::SetTrue)
                    .help("Print a JSON array"),
            ),
        )
        .subcommand(sub("inspect", "Show volumes in detail, as JSON").arg(names(1)))
        .subcommand(
            sub("rm", "Remove volumes")
                .visible_alias("remove")
                .arg(names(1))
                .arg(
                    Arg::new("force")
                        .short('f')
                        .long("force")
                        .action(ArgAction::SetTrue)
                        .help("Remove even while mounted"),
                ),
        )
        .subcommand(sub("prune", "Remove every volume no mount is using"))
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
            "missing volume command (create, ls, inspect, rm, prune)",
        ));
    }
    let cmd = crate::cli::subcommand(&["volume"]).unwrap_or_else(command);
    let m = crate::cli::parse_with(cmd, args)?;
    let state_dir = m.get_one::<PathBuf>("state_dir").cloned();
    let command = match m.subcommand() {
        Some(("create", sm)) => {
            let name = sm.get_one::<String>("name").cloned().unwrap_or_default();
            check_name(&name).map_err(|e| CliError::Invalid(e.to_string()))?;
            let size_limit = match sm.get_one::<String>("size") {
                Some(s) => Some(parse_size(s).map_err(CliError::Invalid)?),
                None => None,
            };
            let mut labels = BTreeMap::new();
            for l in sm.get_many::<String>("label").into_iter().flatten() {
                match l.split_once('=') {
                    Some((k, v)) if !k.is_empty() => {
                        labels.insert(k.to_string(), v.to_string());
                    }
                    _ => {
                        return Err(CliError::Invalid(format!(
                            "label {l:?}: expected KEY=VALUE with a non-empty KEY"
                        )));
                    }
                }
            }
            VolumeCommand::Create {
                name,
                spec: CreateSpec {
                    size_limit,
                    labels,
                    exclusive: sm.get_flag("exclusive"),
                },
            }
        }
        Some(("ls", sm)) => VolumeCommand::Ls {
            json: sm.get_flag("json"),
        },
        Some(("inspect", sm)) => VolumeCommand::Inspect {
            names: checked_names(sm)?,
        },
        Some(("rm", sm)) => VolumeCommand::Rm {
            names: checked_names(sm)?,
            force: sm.get_flag("force"),
        },
        Some(("prune", _)) => VolumeCommand::Prune,
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

fn table(infos: &[VolumeInfo]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "SIZE LIMIT".to_string(),
        "USED".to_string(),
        "MOUNTS".to_string(),
        "CREATED".to_string(),
    ]];
    for i in infos {
        rows.push([
            i.name.clone(),
            i.size_limit.map(human_bytes).unwrap_or_else(|| "-".into()),
            human_bytes(i.bytes_used),
            i.mounts.len().to_string(),
            i.created.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..5)
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
            report(store.create(name, spec).map(|v| format!("{}\n", v.name)))
        }
        VolumeCommand::Ls { json: as_json } => report((|| {
            let infos = store
                .list()?
                .iter()
                .map(|v| v.info())
                .collect::<Result<Vec<_>, _>>()?;
            if *as_json {
                json(&infos)
            } else {
                Ok(table(&infos))
            }
        })()),
        VolumeCommand::Inspect { names } => {
            for n in names {
                report(store.get(n).and_then(|v| v.info()).and_then(|i| json(&i)));
            }
        }
        VolumeCommand::Rm { names, force } => {
            for n in names {
                report(store.remove(n, *force).map(|_| format!("{n}\n")));
            }
        }
        VolumeCommand::Prune => report(store.prune().map(|removed| {
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
            out
        })),
    }
    i32::from(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        for bad in ["", "0", "x", "10Q", "-1", "1..2M"] {
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
