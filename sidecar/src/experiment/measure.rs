//! One request's measurement: the timings read from its server-sent events as they arrive.
//!
//! Time to first token is the arrival of the first event carrying generated content (`delta.content` or
//! `delta.reasoning_content` of a chat chunk, `text` of a completion chunk): the headers and role-only
//! events come earlier and say nothing of the KV transfer. The gaps between content events are the
//! inter-token latencies; the usage event (`stream_options.include_usage`) gives the token counts.

use std::time::Duration;

use serde::Deserialize;

/// What one request measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub class: usize,
    pub assigned: usize,
    /// The arm that served it, by the response's arm tag, also when the body then failed or timed out;
    /// `None`: no response headers or no known arm in the tag.
    pub served: Option<usize>,
    pub status: Option<u16>,
    /// Why it failed: `status 503`, `status 400 unknown_kv_backend`, `timeout`, `transport`, `stream error`,
    /// `incomplete stream`.
    pub error: Option<String>,
    pub ttft_ms: Option<f64>,
    /// Each gap between content events.
    pub itl_ms: Vec<f64>,
    pub e2e_ms: f64,
    pub prompt_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

impl Outcome {
    /// Answered by its own arm, without error: its timings count.
    pub fn counts(&self) -> bool {
        self.error.is_none() && self.served == Some(self.assigned)
    }

    /// The request's median inter-token gap: the unit of the ITL comparison (gaps within one request are
    /// not independent; requests are).
    pub fn median_itl_ms(&self) -> Option<f64> {
        crate::stats::percentile(&self.itl_ms, 50.0)
    }

    /// Time per output token after the first: (last content − first content) / (tokens − 1).
    pub fn tpot_ms(&self) -> Option<f64> {
        let tokens = self.output_tokens.unwrap_or(self.itl_ms.len() as u64 + 1);
        if tokens < 2 || self.itl_ms.is_empty() {
            return None;
        }
        Some(self.itl_ms.iter().sum::<f64>() / (tokens - 1) as f64)
    }
}

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

/// Most bytes of one event kept while waiting for its end (a larger event is a broken stream).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// Reads a `text/event-stream` body incrementally and keeps the timings.
#[derive(Debug, Default)]
pub struct EventStream {
    pending: Vec<u8>,
    first_content: Option<Duration>,
    last_content: Option<Duration>,
    pub gaps_ms: Vec<f64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub done: bool,
    pub error: Option<String>,
}

impl EventStream {
    pub fn feed(&mut self, data: &[u8], at: Duration) {
        if self.error.is_some() {
            return;
        }
        self.pending.extend_from_slice(data);
        // Events end with a blank line; lines may end in \n or \r\n.
        while let Some(end) = event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end.1).take(end.0).collect();
            self.event(&event, at);
        }
        if self.pending.len() > MAX_EVENT_BYTES {
            self.error = Some("stream error".into());
        }
    }

    fn event(&mut self, event: &[u8], at: Duration) {
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.strip_prefix(b" ").unwrap_or(data);
            if data == b"[DONE]" {
                self.done = true;
                continue;
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
            if content {
                if let Some(last) = self.last_content {
                    self.gaps_ms.push(ms(at.saturating_sub(last)));
                }
                self.first_content.get_or_insert(at);
                self.last_content = Some(at);
            }
        }
    }

    pub fn ttft_ms(&self) -> Option<f64> {
        self.first_content.map(ms)
    }
}

/// (length of the event, bytes to drain including its blank line) of the first complete event.
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buffer.len() {
        if buffer[i] == b'\n' {
            if buffer[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if buffer[i + 1] == b'\r' && buffer.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
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
