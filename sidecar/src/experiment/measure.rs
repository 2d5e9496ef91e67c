//! One request's measurement (`execute`): the timings read from its server-sent events as they arrive.
//!
//! Time to first token is the arrival of the first event carrying generated content (`delta.content` or
//! `delta.reasoning_content` of a chat chunk, `text` of a completion chunk): the headers and role-only
//! events come earlier and say nothing of the KV transfer. The gaps between content events are the
//! inter-token latencies; the usage event (`stream_options.include_usage`) gives the token counts.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use kvab_serve::client::{Head, HttpClient, Request};

pub use kvab_judge::requests::Outcome;

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<Delta>,
    text: Option<String>,
    /// A non-streamed chat answer's.
    message: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
    reasoning_content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// Most bytes of one event held while waiting for its end (its data so far and its current line): a
/// larger event fails the request (`event too large`) instead of growing without bound.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Most bytes of an answer's text kept (`EventStream::text`, a multi-turn conversation's next context).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Reads a `text/event-stream` body incrementally and keeps the timings.
///
/// Lines end in CRLF, LF or CR, and a blank line ends an event (the WHATWG server-sent events parsing
/// rules); an event's data is its `data` fields joined by LF, read when its blank line arrives, so the
/// event's time is the arrival of the chunk that completes it. Every byte is looked at once on arrival:
/// only the current line and the current event's data are held, never the bytes already read.
#[derive(Debug, Default)]
pub struct EventStream {
    /// The line being received, without its end.
    line: Vec<u8>,
    /// The data of the event being received: its `data` field values, joined by LF.
    data: Vec<u8>,
    /// The event being received has a `data` field (an empty one too).
    has_data: bool,
    /// The last line ended in CR: an LF right after it is that line end's (CRLF).
    after_cr: bool,
    /// Bytes searched for line ends, to test that each is searched once.
    #[cfg(test)]
    searched: usize,
    first_content: Option<Duration>,
    last_content: Option<Duration>,
    pub gaps_ms: Vec<f64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub done: bool,
    pub error: Option<String>,
    /// Keep the answer's text (`text`): a multi-turn conversation sends it back in its next turn.
    pub keep_text: bool,
    /// The content of the answer, up to `MAX_ANSWER_BYTES`, when `keep_text`.
    pub text: String,
}

impl EventStream {
    pub fn feed(&mut self, mut data: &[u8], at: Duration) {
        while self.error.is_none() && !data.is_empty() {
            if std::mem::take(&mut self.after_cr) {
                if let Some(rest) = data.strip_prefix(b"\n") {
                    data = rest;
                    continue;
                }
            }
            let end = data.iter().position(|&b| b == b'\n' || b == b'\r');
            #[cfg(test)]
            {
                self.searched += end.map_or(data.len(), |end| end + 1);
            }
            let Some(end) = end else {
                self.line.extend_from_slice(data);
                self.limit_size();
                return;
            };
            let (line, rest) = data.split_at(end);
            self.line.extend_from_slice(line);
            self.after_cr = rest.first() == Some(&b'\r');
            data = rest.get(1..).unwrap_or_default();
            self.end_line(at);
            self.limit_size();
        }
    }

    fn limit_size(&mut self) {
        if self.line.len() + self.data.len() > MAX_EVENT_BYTES {
            self.error = Some("event too large".into());
            self.line = Vec::new();
            self.data = Vec::new();
        }
    }

    /// A blank line ends the event; a `data` field adds to its data; other fields and comments are not
    /// read.
    fn end_line(&mut self, at: Duration) {
        if self.line.is_empty() {
            if std::mem::take(&mut self.has_data) {
                let data = std::mem::take(&mut self.data);
                self.event(&data, at);
                // The buffer's room serves the next event.
                self.data = data;
                self.data.clear();
            }
            return;
        }
        let value = match self.line.strip_prefix(b"data") {
            Some(b"") => Some(&b""[..]),
            Some(rest) => rest.strip_prefix(b":"),
            None => None,
        };
        if let Some(value) = value {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if std::mem::replace(&mut self.has_data, true) {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
        }
        self.line.clear();
    }

    /// One event's data.
    fn event(&mut self, data: &[u8], at: Duration) {
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
            self.error = Some("stream error".into());
            return;
        };
        if chunk.error.is_some() {
            self.error = Some("stream error".into());
            return;
        }
        if let Some(usage) = chunk.usage {
            self.prompt_tokens = usage.prompt_tokens.or(self.prompt_tokens);
            self.completion_tokens = usage.completion_tokens.or(self.completion_tokens);
        }
        let content = chunk.choices.iter().any(|c| {
            let delta = c.delta.as_ref();
            [
                c.text.as_ref(),
                delta.and_then(|d| d.content.as_ref()),
                delta.and_then(|d| d.reasoning_content.as_ref()),
            ]
            .into_iter()
            .flatten()
            .any(|t| !t.is_empty())
        });
        if content && self.keep_text {
            for choice in &chunk.choices {
                let piece = choice
                    .delta
                    .as_ref()
                    .and_then(|d| d.content.as_deref())
                    .or(choice.text.as_deref())
                    .unwrap_or_default();
                keep(&mut self.text, piece);
            }
        }
        if content {
            if let Some(last) = self.last_content {
                self.gaps_ms.push(ms(at.saturating_sub(last)));
            }
            self.first_content.get_or_insert(at);
            self.last_content = Some(at);
        }
    }

    pub fn ttft_ms(&self) -> Option<f64> {
        self.first_content.map(ms)
    }
}

/// Most body bytes kept of a non-streamed answer or an error answer.
const MAX_KEPT_BODY: usize = 1 << 20;

/// What every sender needs to measure an answer.
#[derive(Clone)]
pub struct Exchange {
    pub arms: Arc<[String]>,
    /// The arm header.
    pub header: Arc<str>,
    pub stream: bool,
    /// Requests per unit: a conversation's turns, else 1.
    pub turns: u64,
}

/// Sends one request and measures it into `outcome` (its class, arm and group already set); with
/// `keep_text`, also returns the answer's text.
pub async fn execute(
    client: &HttpClient,
    request: &Request,
    mut outcome: Outcome,
    exchange: &Exchange,
    keep_text: bool,
) -> (Outcome, String) {
    let (arms, header, stream) = (&exchange.arms, &*exchange.header, exchange.stream);
    let mut events = EventStream {
        keep_text,
        ..EventStream::default()
    };
    let mut kept: Vec<u8> = Vec::new();
    let started = std::time::Instant::now();
    let result = client
        .stream(request, |data, at| {
            if stream {
                events.feed(data, at);
            }
            let room = MAX_KEPT_BODY.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..data.len().min(room)]);
        })
        .await;
    let response = match result {
        Ok(response) => response,
        Err(failure) => {
            // How long the request held its place (the load curves' requests in flight count it).
            outcome.e2e_ms = ms(started.elapsed());
            // Headers that arrived name the arm that answered, whatever became of the body: the failure
            // is that arm's error. Without them the request stays untagged.
            if let Some(head) = &failure.head {
                outcome.status = Some(head.status);
                outcome.served = served_arm(head, arms, header);
            }
            outcome.error = Some(match outcome.status {
                Some(status) if !(200..300).contains(&status) => status_error(status, &kept),
                _ if failure.timed_out => "timeout".into(),
                _ => "transport".into(),
            });
            return (outcome, String::new());
        }
    };
    let head = &response.head;
    outcome.status = Some(head.status);
    outcome.e2e_ms = ms(response.total);
    outcome.served = served_arm(head, arms, header);
    if !(200..300).contains(&head.status) {
        outcome.error = Some(status_error(head.status, &kept));
        return (outcome, String::new());
    }
    if !stream {
        (outcome.prompt_tokens, outcome.output_tokens) = usage_of(&kept);
        let text = if keep_text {
            answer_of(&kept)
        } else {
            String::new()
        };
        return (outcome, text);
    }
    outcome.ttft_ms = events.ttft_ms();
    outcome.prompt_tokens = events.prompt_tokens;
    outcome.output_tokens = events.completion_tokens;
    outcome.error = events.error.clone().or_else(|| {
        if !events.done {
            Some("incomplete stream".into())
        } else if outcome.ttft_ms.is_none() {
            Some("no content".into())
        } else {
            None
        }
    });
    outcome.itl_ms = std::mem::take(&mut events.gaps_ms);
    (outcome, events.text)
}

/// The arm named by the response's arm tag, if it names one.
fn served_arm(head: &Head, arms: &[String], header: &str) -> Option<usize> {
    head.header(header)
        .and_then(|tag| arms.iter().position(|a| a == tag))
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Appends `piece` to `text` as far as `MAX_ANSWER_BYTES` allows, at a character boundary.
fn keep(text: &mut String, piece: &str) {
    let room = MAX_ANSWER_BYTES.saturating_sub(text.len());
    let mut end = piece.len().min(room);
    while !piece.is_char_boundary(end) {
        end -= 1;
    }
    text.push_str(piece.get(..end).unwrap_or_default());
}

/// A non-streamed answer's text (its first choice's message or text), up to `MAX_ANSWER_BYTES`.
pub fn answer_of(body: &[u8]) -> String {
    let mut text = String::new();
    if let Ok(chunk) = serde_json::from_slice::<Chunk>(body) {
        if let Some(choice) = chunk.choices.first() {
            let content = choice.message.as_ref().and_then(|m| m.content.as_deref());
            keep(
                &mut text,
                content.or(choice.text.as_deref()).unwrap_or_default(),
            );
        }
    }
    text
}

/// A non-streamed answer's usage.
pub fn usage_of(body: &[u8]) -> (Option<u64>, Option<u64>) {
    match serde_json::from_slice::<Chunk>(body) {
        Ok(Chunk { usage: Some(u), .. }) => (u.prompt_tokens, u.completion_tokens),
        _ => (None, None),
    }
}

/// `status 400 unknown_kv_backend` from an OpenAI-style error body, else `status 400`.
pub fn status_error(status: u16, body: &[u8]) -> String {
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let code = v.get("error")?.get("code")?;
            code.as_str()
                .map(str::to_string)
                .or_else(|| code.as_i64().map(|c| c.to_string()))
        });
    match code {
        Some(code) if code != status.to_string() && code.len() <= 64 => {
            format!("status {status} {code}")
        }
        _ => format!("status {status}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn first_content_event_is_the_first_token_and_role_events_are_not() {
        let mut s = EventStream::default();
        s.feed(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            at(5),
        );
        assert_eq!(s.ttft_ms(), None);
        // An event split across chunks, \r\n line ends: it is complete when its blank line arrives.
        s.feed(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\r",
            at(40),
        );
        assert_eq!(s.ttft_ms(), None);
        s.feed(
            b"\n\r\ndata: {\"choices\":[{\"delta\":{\"content\":\" there\"}}]}\n\n",
            at(43),
        );
        s.feed(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"!\"}}]}\n\n",
            at(50),
        );
        s.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":130,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n", at(51));
        assert_eq!(s.ttft_ms(), Some(43.0));
        assert_eq!(s.gaps_ms, vec![0.0, 7.0]);
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(130), Some(3)));
        assert!(s.done && s.error.is_none());
    }

    #[test]
    fn completions_text_counts_and_garbage_is_a_stream_error() {
        let mut s = EventStream::default();
        s.feed(
            b"data: {\"choices\":[{\"text\":\"\"}]}\n\ndata: {\"choices\":[{\"text\":\"a\"}]}\n\n",
            at(9),
        );
        assert_eq!(s.ttft_ms(), Some(9.0));
        s.feed(b"data: {not json\n\n", at(10));
        assert_eq!(s.error.as_deref(), Some("stream error"));
        let mut e = EventStream::default();
        e.feed(b"data: {\"error\":{\"message\":\"boom\"}}\n\n", at(1));
        assert_eq!(e.error.as_deref(), Some("stream error"));
    }

    /// What a stream measured: time to first token, gaps, tokens, done, error.
    type Measured = (
        Option<f64>,
        Vec<f64>,
        Option<u64>,
        Option<u64>,
        bool,
        Option<String>,
    );

    /// What a stream measured, to compare two ways of feeding it.
    fn measured(s: &EventStream) -> Measured {
        (
            s.ttft_ms(),
            s.gaps_ms.clone(),
            s.prompt_tokens,
            s.completion_tokens,
            s.done,
            s.error.clone(),
        )
    }

    fn content_event(text: &str) -> String {
        format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n")
    }

    #[test]
    fn lines_end_in_crlf_lf_or_cr_and_data_lines_join() {
        let mut s = EventStream::default();
        // CR line ends; a comment, an id and an event name are not data.
        s.feed(
            b": keep-alive\r\rid: 1\revent: chunk\rdata: {\"choices\":[{\"text\":\"a\"}]}\r",
            at(3),
        );
        assert_eq!(s.ttft_ms(), None);
        // The CR that ends the event arrives alone; the LF after it (CRLF) does not end another line.
        s.feed(b"\r", at(4));
        assert_eq!(s.ttft_ms(), Some(4.0));
        // One JSON value over two data lines is one event's data.
        s.feed(b"\ndata: {\"choices\":[{\"text\":\"b\"}],\ndata:\"usage\":{\"completion_tokens\":2}}\n\n", at(6));
        s.feed(b"data:[DONE]\r\n\r\n", at(7));
        assert_eq!(s.gaps_ms, vec![2.0]);
        assert_eq!(s.completion_tokens, Some(2));
        assert!(s.done && s.error.is_none());
    }

    #[test]
    fn any_split_into_chunks_measures_what_the_whole_body_does() {
        let bodies = [
            format!("{}{}data: [DONE]\n\n", content_event("Hi"), content_event("!")),
            "data: {\"choices\":[{\"text\":\"a\"}]}\r\n\r\n: c\r\rdata: {\"choices\":[],\r\ndata: \"usage\":\
             {\"prompt_tokens\":7,\"completion_tokens\":1}}\r\rdata: [DONE]\r\n\r\n"
                .to_string(),
            format!("{}data: {{oops\n\n{}", content_event("x"), content_event("y")),
            format!("{}data: [DONE]\n", content_event("no blank line at the end")),
        ];
        for body in bodies.iter().map(String::as_bytes) {
            let mut whole = EventStream::default();
            whole.feed(body, at(1));
            let expected = measured(&whole);
            let mut bytewise = EventStream::default();
            for byte in body.chunks(1) {
                bytewise.feed(byte, at(1));
            }
            assert_eq!(measured(&bytewise), expected, "byte by byte");
            for i in 0..=body.len() {
                for j in i..=body.len() {
                    let mut split = EventStream::default();
                    for piece in [&body[..i], &body[i..j], &body[j..]] {
                        split.feed(piece, at(1));
                    }
                    assert_eq!(measured(&split), expected, "split at {i} and {j}");
                }
            }
        }
    }

    #[test]
    fn each_byte_is_searched_once_however_small_the_chunks() {
        // One event of almost MAX_EVENT_BYTES, in 64-byte chunks: 16,384 chunks, each searched alone.
        let text = "x".repeat(MAX_EVENT_BYTES - 64);
        let body = format!("{}data: [DONE]\n\n", content_event(&text));
        let mut s = EventStream::default();
        for (i, chunk) in body.as_bytes().chunks(64).enumerate() {
            s.feed(chunk, at(i as u64));
        }
        assert!(
            s.searched <= body.len(),
            "{} bytes searched for {}",
            s.searched,
            body.len()
        );
        assert!(s.done && s.error.is_none());
        assert!(s.ttft_ms().is_some());
    }

    #[test]
    fn an_event_over_the_limit_fails_the_stream_and_is_not_kept() {
        let mut s = EventStream::default();
        let chunk = [b'x'; 4096];
        s.feed(b"data: ", at(1));
        for _ in 0..=MAX_EVENT_BYTES / chunk.len() {
            s.feed(&chunk, at(1));
        }
        assert_eq!(s.error.as_deref(), Some("event too large"));
        assert_eq!(s.line.capacity() + s.data.capacity(), 0);
        s.feed(content_event("late").as_bytes(), at(2));
        assert_eq!(s.ttft_ms(), None);
    }

    #[test]
    fn error_codes_are_read_from_openai_error_bodies() {
        let body = br#"{"error":{"message":"x","type":"invalid_request_error","code":"unknown_kv_backend"}}"#;
        assert_eq!(status_error(400, body), "status 400 unknown_kv_backend");
        assert_eq!(status_error(503, b"no healthy upstream"), "status 503");
        assert_eq!(
            status_error(400, br#"{"error":{"code":400}}"#),
            "status 400"
        );
    }

    #[test]
    fn tpot_uses_the_usage_count() {
        let outcome = Outcome {
            itl_ms: vec![2.0, 4.0],
            output_tokens: Some(3),
            ..Outcome::default()
        };
        assert_eq!(outcome.tpot_ms(), Some(3.0));
        assert_eq!(outcome.median_itl_ms(), Some(3.0));
        assert_eq!(Outcome::default().tpot_ms(), None);
    }
}
