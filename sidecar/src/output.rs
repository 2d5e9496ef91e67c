//! What the tools print and write, and the one place where their outcome becomes an exit status: the
//! report as JSON or as a table, the HTML page, the verdict's status (0 decided, 1 invalid, 2
//! inconclusive), and 3 for a run that could not be judged (`Failure`). `run` gives every tool the same
//! async runtime.

use std::future::Future;
use std::process::ExitCode;

use serde::Serialize;

use kvab_judge::Verdict;

/// Why a tool gave no verdict: exit status 3 either way.
#[derive(Debug)]
pub enum Failure {
    /// The command line asks for what cannot be: `error: …`, then where to read more.
    Usage(String),
    /// The run failed (the network, a file, the runtime): `kvab <command>: …`.
    Run(String),
}

/// The exit status of a run that could not be judged.
const FAILED: u8 = 3;

/// Runs `kvab <command>` on the tools' one runtime (multi-threaded, timers and I/O on), and makes its
/// outcome the process's: the status it gave, or a `Failure` printed on stderr and 3.
pub fn run(command: &str, tool: impl Future<Output = Result<ExitCode, Failure>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return failed(
                command,
                Failure::Run(format!("cannot start the async runtime: {e}")),
            )
        }
    };
    match runtime.block_on(tool) {
        Ok(status) => status,
        Err(failure) => failed(command, failure),
    }
}

/// Prints `failure` as `kvab <command>` says it; the status is 3.
fn failed(command: &str, failure: Failure) -> ExitCode {
    match failure {
        Failure::Usage(message) => {
            eprintln!("error: {message}\n\nFor more information, try 'kvab {command} --help'.")
        }
        Failure::Run(message) => eprintln!("kvab {command}: {message}"),
    }
    ExitCode::from(FAILED)
}

/// The output of `kvab experiment` and `kvab analyze`: the HTML report (through a temporary file, so a
/// reader never sees half of it), then the JSON or the table on stdout; the exit status is the verdict's.
pub fn emit<T: Serialize>(
    report: &T,
    verdict: Verdict,
    json: bool,
    table: impl FnOnce() -> String,
    html: Option<(&std::path::Path, String)>,
) -> Result<ExitCode, Failure> {
    if let Some((path, page)) = html {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        std::fs::write(&temporary, page)
            .and_then(|()| std::fs::rename(&temporary, path))
            .map_err(|e| Failure::Run(format!("cannot write --html {}: {e}", path.display())))?;
    }
    if json {
        let text = serde_json::to_string_pretty(report)
            .map_err(|e| Failure::Run(format!("cannot encode the report: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", table());
    }
    Ok(ExitCode::from(verdict.exit_code()))
}
