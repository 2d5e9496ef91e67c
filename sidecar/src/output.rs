//! What the tools print and write: the report as JSON or as a table, the HTML page, and the exit status
//! that goes with the verdict. The one place where `kvab experiment` and `kvab analyze` do that I/O.

use serde::Serialize;

use kvab_judge::Verdict;

/// The output of `kvab experiment` and `kvab analyze`: the HTML report (through a temporary file, so a
/// reader never sees half of it), then the JSON or the table on stdout; the exit status is the verdict's.
pub fn emit<T: Serialize>(
    command: &str,
    report: &T,
    verdict: Verdict,
    json: bool,
    table: impl FnOnce() -> String,
    html: Option<(&std::path::Path, String)>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    if let Some((path, page)) = html {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        if let Err(e) =
            std::fs::write(&temporary, page).and_then(|()| std::fs::rename(&temporary, path))
        {
            eprintln!(
                "kvab {command}: cannot write --html {}: {e}",
                path.display()
            );
            return ExitCode::from(3);
        }
    }
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("kvab {command}: cannot encode the report: {e}");
                return ExitCode::from(3);
            }
        }
    } else {
        print!("{}", table());
    }
    ExitCode::from(verdict.exit_code())
}
