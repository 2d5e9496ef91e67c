//! Where the answers come from: Prometheus's HTTP API (`--prometheus`), or a file of answers that an
//! earlier run recorded (`--save-answers`, read back by `--answers`). The rest of analyze asks
//! `Source::vector` and does not know which.
//!
//! The file (docs/analyze.md, "Recorded answers"), one JSON document:
//!
//! ```json
//! {"format": "kvab-analyze-answers", "version": 1,
//!  "window": {"start": 1796252028.9, "end": 1796252038.6},
//!  "answers": [{"query": "sum by (backend, le) (...)", "time": "1796252038.600",
//!               "answer": {"status": "success", "data": {"resultType": "vector", "result": [...]}}}]}
//! ```

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

use serde_json::{json, Value};

use super::prometheus::{answer, evaluation_time, printable, Prometheus, MAX_ANSWER_BYTES};
use super::series::Samples;
use kvab_judge::report::production::Window;

/// The `format` of a file of answers.
pub const FORMAT: &str = "kvab-analyze-answers";
/// The one `version` of the format this kvab writes and reads.
pub const VERSION: u64 = 1;
/// The most bytes of a file of answers, written or read: 64 MiB. A run asks at most 12 queries, whose
/// answers are a few kilobytes each; one answer is already capped at 16 MiB (`MAX_ANSWER_BYTES`).
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// The most answers in a file: 64 (a run asks 9, or 12 with `--vllm-selector`).
pub const MAX_ANSWERS: usize = 64;

/// One query asked, and the answer's body (JSON) as it came.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub query: String,
    /// The query's `time` parameter (`prometheus::evaluation_time`).
    pub time: String,
    pub answer: Value,
}

/// The answers of a file, by (query, time).
#[derive(Debug)]
pub struct Recording {
    /// The file, as the user named it (for messages).
    name: String,
    window: Window,
    answers: BTreeMap<(String, String), Value>,
}

/// Where `vector` gets its answers.
pub enum Source {
    /// Prometheus; every answer kept (in order) when `--save-answers` will write them.
    Live {
        prometheus: Box<Prometheus>,
        kept: Option<Vec<Recorded>>,
    },
    /// A file of recorded answers: no network.
    Recorded(Recording),
}

impl Source {
    pub fn live(prometheus: Prometheus, keep: bool) -> Self {
        Source::Live {
            prometheus: Box::new(prometheus),
            kept: keep.then(Vec::new),
        }
    }

    /// The samples of the instant vector `query` at the window's end, or one line naming the query.
    pub async fn vector(&mut self, query: &str) -> Result<Samples, String> {
        match self {
            Source::Live { prometheus, kept } => {
                let (samples, body) = prometheus.vector(query).await?;
                if let Some(kept) = kept {
                    // Samples were read from it, so the body is JSON.
                    let answer = serde_json::from_slice(&body)
                        .map_err(|e| format!("query {query}: the answer is no JSON ({e})"))?;
                    kept.push(Recorded {
                        query: query.to_string(),
                        time: prometheus.time(),
                        answer,
                    });
                }
                Ok(samples)
            }
            Source::Recorded(recording) => recording.vector(query),
        }
    }

    /// The answers kept by a live source, `None` for a recorded one or when none were kept.
    pub fn kept(&self) -> Option<&[Recorded]> {
        match self {
            Source::Live { kept, .. } => kept.as_deref(),
            Source::Recorded(_) => None,
        }
    }
}

impl Recording {
    /// The answers of the file at `path`, or one line naming the file and the field that is wrong.
    pub fn read(path: &Path) -> Result<Self, String> {
        let name = path.display().to_string();
        let fail = |why: String| format!("--answers {name}: {why}");
        let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| fail(e.to_string()))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(fail(format!(
                "longer than {MAX_FILE_BYTES} bytes, more than a file of answers may hold"
            )));
        }
        let document: Value =
            serde_json::from_slice(&bytes).map_err(|e| fail(format!("not JSON ({e})")))?;
        Self::from_document(name.clone(), &document).map_err(fail)
    }

    /// The answers of a parsed file; an error names the field (`answers[3].query`).
    pub fn from_document(name: String, document: &Value) -> Result<Self, String> {
        let format = document.get("format").and_then(Value::as_str);
        if format != Some(FORMAT) {
            return Err(format!(
                "format: wants \"{FORMAT}\" (a file written by kvab analyze --save-answers), found {}",
                shown(document.get("format"))
            ));
        }
        match document.get("version").and_then(Value::as_u64) {
            Some(VERSION) => {}
            _ => {
                return Err(format!(
                    "version: this kvab reads version {VERSION}, found {}",
                    shown(document.get("version"))
                ))
            }
        }
        let time = |field: &str| {
            document
                .pointer(&format!("/window/{field}"))
                .and_then(Value::as_f64)
                .filter(|t| t.is_finite() && *t > 0.0)
                .ok_or_else(|| format!("window.{field}: wants a time, Unix seconds"))
        };
        let window = Window::new(time("start")?, time("end")?)
            .map_err(|_| "window: start is not before end".to_string())?;
        let list = document
            .get("answers")
            .and_then(Value::as_array)
            .ok_or("answers: wants a list")?;
        if list.len() > MAX_ANSWERS {
            return Err(format!(
                "answers: {} answers, more than the {MAX_ANSWERS} a file may hold",
                list.len()
            ));
        }
        let mut answers = BTreeMap::new();
        for (i, entry) in list.iter().enumerate() {
            let text = |field: &str| {
                entry
                    .get(field)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| format!("answers[{i}].{field}: wants a string"))
            };
            let (query, time) = (text("query")?, text("time")?);
            let answer = entry
                .get("answer")
                .filter(|a| a.is_object())
                .ok_or_else(|| {
                    format!("answers[{i}].answer: wants Prometheus's answer, an object")
                })?;
            if answer.to_string().len() > MAX_ANSWER_BYTES {
                return Err(format!(
                    "answers[{i}].answer: longer than {MAX_ANSWER_BYTES} bytes"
                ));
            }
            if answers
                .insert((query.clone(), time.clone()), answer.clone())
                .is_some()
            {
                return Err(format!(
                    "answers[{i}]: a second answer to query {} at time {}",
                    printable(&query),
                    printable(&time)
                ));
            }
        }
        Ok(Recording {
            name,
            window,
            answers,
        })
    }

    /// The window the answers were recorded for.
    pub fn window(&self) -> Window {
        self.window.clone()
    }

    /// The recorded answer to `query` at the window's end, read as a live answer is.
    fn vector(&self, query: &str) -> Result<Samples, String> {
        let key = (query.to_string(), evaluation_time(self.window.end));
        let Some(recorded) = self.answers.get(&key) else {
            return Err(format!(
                "query {query}: not in --answers {} (--selector, --vllm-selector and --vllm-arm-label shape \
                 the queries: are they as when it was recorded?)",
                self.name
            ));
        };
        answer(recorded.to_string().as_bytes(), 200)
            .map_err(|why| format!("query {query}: {}", printable(&why)))
    }
}

/// A field's value as a message shows it (`missing` when absent), printable and at most 60 characters.
fn shown(value: Option<&Value>) -> String {
    let text = value.map_or("missing".to_string(), Value::to_string);
    let cut: String = text.chars().take(60).collect();
    printable(&cut)
}

/// The file of `answers` recorded over `window`, as written by `save`.
pub fn document(answers: &[Recorded], window: &Window) -> Value {
    let answers: Vec<Value> = answers
        .iter()
        .map(|r| json!({"query": r.query, "time": r.time, "answer": r.answer}))
        .collect();
    json!({
        "format": FORMAT,
        "version": VERSION,
        "window": {"start": window.start, "end": window.end},
        "answers": answers,
    })
}

/// Writes the file of `answers` to `path`: to `path.tmp`, then renamed, so a reader never sees half a
/// file. An error (or a file over `MAX_FILE_BYTES`) is one line naming `--save-answers`.
pub fn save(path: &Path, answers: &[Recorded], window: &Window) -> Result<(), String> {
    let name = path.display();
    let mut text = serde_json::to_vec_pretty(&document(answers, window))
        .map_err(|e| format!("--save-answers {name}: cannot encode the answers: {e}"))?;
    text.push(b'\n');
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "--save-answers {name}: the answers take {} bytes, more than the {MAX_FILE_BYTES} a file of \
             answers may hold",
            text.len()
        ));
    }
    crate::output::replace(path, &text).map_err(|e| format!("--save-answers {name}: {e}"))
}
