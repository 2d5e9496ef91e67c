//! Conversations in the ShareGPT JSON layout (`--prompts FILE.json`), as the serving benchmarks read them
//! (vLLM's `benchmark_serving --dataset-name sharegpt`, GuideLLM): a JSON array of
//! `{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}` (other
//! fields ignored). The human turns are the user messages; each answer's length in tokens is estimated
//! from the gpt turn that follows (4 tokens per 3 words, English's usual ratio) and becomes that turn's
//! `max_tokens`.

use std::io::Read;
use std::path::Path;

use serde::Deserialize;

/// Largest conversations file read: 1 GiB (the ShareGPT V3 dataset is about 650 MB).
const MAX_FILE_BYTES: u64 = 1 << 30;
/// Most conversations kept.
const MAX_CONVERSATIONS: usize = 1_000_000;
/// The largest `max_tokens` taken from a reply (as `--max-tokens`).
const MAX_REPLY_TOKENS: u32 = 65_536;

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    conversations: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    from: String,
    value: String,
}

/// One turn of a conversation: the user's message, and the answer's length in tokens the dataset gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub user: String,
    pub max_tokens: Option<u32>,
}

/// Whether the file is a JSON array (ShareGPT's layout) rather than JSON Lines.
pub fn is_sharegpt(path: &Path) -> Result<bool, String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("--prompts {}: {e}", path.display()))?;
    let mut head = [0u8; 4096];
    let n = file
        .read(&mut head)
        .map_err(|e| format!("--prompts {}: {e}", path.display()))?;
    let first = head
        .get(..n)
        .unwrap_or_default()
        .iter()
        .find(|b| !b.is_ascii_whitespace());
    Ok(first == Some(&b'['))
}

/// The file's conversations with at least `turns` human turns, each cut to its first `turns` (1: the first
/// human turn alone, a single-shot prompt); and how many were left out for having fewer.
pub fn read(path: &Path, turns: usize) -> Result<(Vec<Vec<Turn>>, usize), String> {
    let name = format!("--prompts {}", path.display());
    let file = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let size = file.metadata().map_err(|e| format!("{name}: {e}"))?.len();
    if size > MAX_FILE_BYTES {
        return Err(format!(
            "{name}: {size} bytes, more than the {MAX_FILE_BYTES} a conversations file may have"
        ));
    }
    let entries: Vec<Entry> = serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| {
        format!("{name}: not a ShareGPT conversations file (a JSON array of {{\"conversations\": [{{\"from\", \"value\"}}]}}): {e}")
    })?;
    let (mut kept, mut short) = (Vec::new(), 0usize);
    for entry in entries {
        let conversation = conversation(&entry.conversations, turns);
        if conversation.len() < turns {
            short += 1;
            continue;
        }
        kept.push(conversation);
        if kept.len() >= MAX_CONVERSATIONS {
            break;
        }
    }
    if kept.is_empty() {
        return Err(format!(
            "{name}: no conversation with {turns} human turn(s) ({short} with fewer)"
        ));
    }
    Ok((kept, short))
}

/// The first `turns` human turns, each with the length of the gpt answer after it. A conversation that
/// opens with the model (or a system message) starts at its first human turn.
fn conversation(messages: &[Message], turns: usize) -> Vec<Turn> {
    let mut out: Vec<Turn> = Vec::new();
    for message in messages {
        match message.from.as_str() {
            // A blank human turn is no turn: it takes no place among the first `turns`.
            "human" | "user" if out.len() < turns && !message.value.trim().is_empty() => {
                out.push(Turn {
                    user: message.value.clone(),
                    max_tokens: None,
                })
            }
            "gpt" | "assistant" | "chatgpt" | "bard" => {
                if let Some(last) = out.last_mut().filter(|t| t.max_tokens.is_none()) {
                    last.max_tokens = Some(reply_tokens(&message.value));
                }
            }
            _ => {}
        }
    }
    out
}

/// A reply's length in tokens, estimated from its words (4 tokens per 3 words), at least 1.
fn reply_tokens(reply: &str) -> u32 {
    let words = reply.split_whitespace().count() as u64;
    (words * 4)
        .div_ceil(3)
        .clamp(1, u64::from(MAX_REPLY_TOKENS)) as u32
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn human_turns_become_messages_and_replies_their_lengths() {
        let dir = std::env::temp_dir().join(format!("kvab-sharegpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sharegpt.json");
        std::fs::write(
            &path,
            r#" [{"id": "a", "conversations": [
                  {"from": "system", "value": "be brief"},
                  {"from": "human", "value": "hello there"},
                  {"from": "gpt", "value": "one two three four five six"},
                  {"from": "human", "value": "and then?"},
                  {"from": "gpt", "value": "x"}]},
                {"id": "b", "conversations": [{"from": "human", "value": "alone"}]},
                {"id": "c", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"},
                  {"from": "gpt", "value": "r s t"}, {"from": "human", "value": "q2"}]}]"#,
        )
        .unwrap();
        assert!(is_sharegpt(&path).unwrap());
        let (single, short) = read(&path, 1).unwrap();
        assert_eq!((single.len(), short), (3, 0));
        assert_eq!(
            single[0],
            vec![Turn {
                user: "hello there".into(),
                max_tokens: Some(8)
            }]
        );
        assert_eq!(single[1][0].max_tokens, None, "no reply: --max-tokens");
        let (pairs, short) = read(&path, 2).unwrap();
        assert_eq!((pairs.len(), short), (2, 1), "b has one human turn");
        assert_eq!(pairs[0][1].max_tokens, Some(2));
        assert_eq!(pairs[1][0].user, "q", "c starts at its first human turn");
        assert_eq!(
            (pairs[1][0].max_tokens, pairs[1][1].max_tokens),
            (Some(4), None)
        );
        assert!(read(&path, 3)
            .unwrap_err()
            .contains("no conversation with 3 human turn(s) (3 with fewer)"));
        std::fs::write(&path, "[{\"conversations\": 3}]").unwrap();
        assert!(read(&path, 1)
            .unwrap_err()
            .contains("not a ShareGPT conversations file"));
        std::fs::write(&path, "{\"prompt\": \"a\"}\n").unwrap();
        assert!(!is_sharegpt(&path).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
