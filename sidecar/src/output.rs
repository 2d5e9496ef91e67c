//! What the tools print and write, and the one place where their outcome becomes an exit status: the
//! report as JSON or as a table, the HTML page, the verdict's status (0 decided, 1 invalid, 2
//! inconclusive), and 3 for a run that could not be judged (`Failure`); `kvab serve`'s 0, 1 and 2. `run`
//! and `serve` give every command the same async runtime.

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

/// The one runtime of every command: multi-threaded, timers and I/O on.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Runs `kvab serve`: 2 for a configuration error (logged, naming the key), 0 after `--check-config`
/// (its summary on stdout) or a clean shutdown, 1 when serving failed (logged).
pub fn serve(options: kvab_serve::Options) -> ExitCode {
    let prepared = match kvab_serve::prepare(options) {
        Err(e) => {
            log::error!("configuration error: {e}");
            return ExitCode::from(2);
        }
        Ok(kvab_serve::Start::Checked(summary)) => {
            println!("{summary}");
            return ExitCode::SUCCESS;
        }
        Ok(kvab_serve::Start::Serve(prepared)) => prepared,
    };
    let done = runtime().and_then(|runtime| {
        runtime
            .block_on(kvab_serve::run(prepared))
            .map_err(|e| format!("{e:#}"))
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `kvab <command>` (a tool) on the one runtime, and makes its outcome the process's: the status it
/// gave, or a `Failure` printed on stderr and 3.
pub fn run(command: &str, tool: impl Future<Output = Result<ExitCode, Failure>>) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => return failed(command, Failure::Run(e)),
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

/// Writes `bytes` to `path` through `<path>.tmp` and a rename, so a reader never sees half a file.
pub fn replace(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, bytes).and_then(|()| std::fs::rename(&temporary, path))
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
        replace(path, page.as_bytes())
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
