//! The command line: subcommands and the flags of `kvab serve`. `kvab check`'s flags are `check::options`.
//! `--help` is the reference; docs show its output and tests/sidecar/test_cli.py keeps them equal.

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::analyze::options::AnalyzeArgs;
use crate::check::options::CheckArgs;
use crate::experiment::options::ExperimentArgs;

#[derive(Debug, Parser)]
#[command(
    name = "kvab",
    version,
    about = "A/B testing of KV-cache transfer backends behind an inference gateway",
    after_help = "Environment: RUST_LOG sets the log filter (default: info)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the arm -> proxy endpoint map (GET /v1/endpoints), take the filter's routing counts
    /// (POST /v1/reports), and serve /healthz, /readyz and /metrics.
    Serve(ServeArgs),
    /// Run the A/B runbook with a verdict.
    Check(Box<CheckArgs>),
    /// Run a randomized A/B of the arms and judge which is faster, where, by how much, how sure.
    Experiment(Box<ExperimentArgs>),
    /// Judge the A/B on production traffic from what Prometheus holds (the filter's histograms and counters).
    Analyze(Box<AnalyzeArgs>),
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Environment: KUBECONFIG for source = \"kubernetes\" (default: ~/.kube/config, then in-cluster).\n\
                        Exit status: 0 clean shutdown, 1 runtime failure, 2 usage or configuration error."
)]
pub struct ServeArgs {
    /// TOML configuration (every key: docs/sidecar.md) [default: the embedded local configuration with
    /// static endpoints].
    #[arg(long, value_name = "PATH", env = "KVAB_CONFIG")]
    pub config: Option<String>,
    /// Validate the configuration, print a summary and exit (0 valid, 2 invalid).
    #[arg(long)]
    pub check_config: bool,
    /// When the report state (reports.state_file) is damaged, move its files aside (suffix .damaged.<n>)
    /// and start counting from zero, each filter VM's next report a baseline; a state that reads is kept.
    #[arg(long)]
    pub repair_state: bool,
}

/// Exit status of a usage error: `kvab check`, `experiment` and `analyze` keep their documented 3 (0–2 are
/// verdicts); the rest use 2.
pub fn usage_exit_code(args: &[OsString]) -> u8 {
    if args
        .get(1)
        .is_some_and(|a| matches!(a.to_str(), Some("check" | "experiment" | "analyze")))
    {
        3
    } else {
        2
    }
}

/// The command definition as `--help` shows it: fixed width and no environment values, so the output is
/// the same on every machine (and never prints a value taken from the environment).
fn command() -> clap::Command {
    let hide_values = |arg: clap::Arg| arg.hide_env_values(true);
    let mut command = Cli::command().term_width(100).mut_args(hide_values);
    let names: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .collect();
    for name in names {
        command = command.mut_subcommand(name, |sub| sub.mut_args(hide_values));
    }
    command
}

/// Parses the process arguments (the program name first). `Err` carries clap's message, help or version,
/// to be printed with `clap::Error::print`.
pub fn parse_from<I, T>(args: I) -> Result<Command, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    let mut parsed = Cli::from_arg_matches(&matches)?.command;
    // `kvab experiment --judge-records` tells the flags given from the defaults.
    if let (Command::Experiment(experiment), Some(sub)) =
        (&mut parsed, matches.subcommand_matches("experiment"))
    {
        experiment.note_sources(sub);
    }
    Ok(parsed)
}

/// Prints a parse error (or help, or the version). A refused value that came from the environment, not from
/// the command line, gets a line naming the variable: clap's message names only the flag.
pub fn print_error(error: &clap::Error, args: &[OsString]) {
    let _ = error.print();
    if let Some(variable) = environment_source(error, args) {
        eprintln!("note: the value is from the environment variable {variable}");
    }
}

fn environment_source(error: &clap::Error, args: &[OsString]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(invalid)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    // "--burst-requests <N>"
    let long = invalid.split_whitespace().next()?.strip_prefix("--")?;
    let typed = |arg: &OsString| {
        arg.to_str().is_some_and(|arg| {
            arg.strip_prefix("--")
                .is_some_and(|rest| rest == long || rest.starts_with(&format!("{long}=")))
        })
    };
    if args.iter().any(typed) {
        return None;
    }
    // The flag of the subcommand typed (two subcommands may share a flag name, with different variables).
    let command = command();
    let typed_subcommand = args.get(1).and_then(|name| name.to_str());
    let variable = std::iter::once(&command)
        .chain(
            command
                .get_subcommands()
                .filter(|sub| Some(sub.get_name()) == typed_subcommand),
        )
        .flat_map(|sub| sub.get_arguments())
        .find(|arg| arg.get_long() == Some(long))?
        .get_env()?;
    std::env::var_os(variable).map(|_| variable.to_string_lossy().into_owned())
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn serve_arguments() {
        match parse_from(["kvab", "serve", "--config", "a.toml", "--check-config"]) {
            Ok(Command::Serve(args)) => {
                assert_eq!(args.config.as_deref(), Some("a.toml"));
                assert!(args.check_config);
            }
            other => panic!("not parsed as serve: {other:?}"),
        }
        match parse_from(["kvab", "serve", "--config=b.toml"]) {
            Ok(Command::Serve(args)) => assert_eq!(args.config.as_deref(), Some("b.toml")),
            other => panic!("not parsed as serve: {other:?}"),
        }
        assert!(parse_from(["kvab", "serve", "--config"]).is_err());
        assert!(parse_from(["kvab", "serve", "--listen", "x"]).is_err());
        assert!(parse_from(["kvab"]).is_err());
    }

    #[test]
    fn the_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn usage_errors_of_check_and_experiment_exit_3() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(usage_exit_code(&args(&["kvab", "check", "--x"])), 3);
        assert_eq!(usage_exit_code(&args(&["kvab", "experiment", "--x"])), 3);
        assert_eq!(usage_exit_code(&args(&["kvab", "serve", "--x"])), 2);
        assert_eq!(usage_exit_code(&args(&["kvab", "frobnicate"])), 2);
    }
}
