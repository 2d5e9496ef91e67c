//! `kvab`: one binary, four commands. `cli` parses the command line; `kvab serve` is the `kvab-serve`
//! crate, `kvab check` (the runbook with a verdict), `kvab experiment` (randomized A/B load) and `kvab
//! analyze` (the A/B on production traffic) are the module trees of the same names.

mod analyze;
mod args;
mod check;
mod cli;
mod cluster;
mod experiment;
mod output;

use std::process::ExitCode;

use kvab_serve::fence;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Every command: a panic outside a request's fence ends the process at once (fence.rs).
    fence::install_hook();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let serve_args = match cli::parse_from(&args) {
        Ok(cli::Command::Serve(serve_args)) => serve_args,
        Ok(cli::Command::Check(check_args)) => return check::main(*check_args),
        Ok(cli::Command::Experiment(experiment_args)) => return experiment::main(*experiment_args),
        Ok(cli::Command::Analyze(analyze_args)) => return analyze::main(*analyze_args),
        Err(e) => {
            cli::print_error(&e, &args);
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(cli::usage_exit_code(&args)),
            };
        }
    };
    output::serve(kvab_serve::Options {
        config: serve_args.config,
        check_config: serve_args.check_config,
        repair_state: serve_args.repair_state,
    })
}
