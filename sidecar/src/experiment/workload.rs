//! The workload: classes of prompts and the request body of each request.
//!
//! Synthetic prompts approximate `N` tokens with `N` words from a list of common English words that BPE
//! tokenizers (Qwen's, Llama's, GPT's) encode as one token each, after a unique request number: the number
//! makes every prompt's first KV block different, so the server's prefix cache cannot serve one prompt from
//! another and every request moves its full KV cache. The chat template adds a few tokens; the report shows
//! the server's own `usage.prompt_tokens` beside the size asked for.

use std::path::Path;

use rand::rngs::ChaCha8Rng;
use rand::{Rng, RngExt, SeedableRng};
use serde_json::{json, Value};

use super::options::{Endpoint, Options, Workload};
use super::sharegpt::{self, Turn};
use kvab_judge::reuse::{turns_of, Shape};

/// Words that are one token each in common BPE vocabularies (with their leading space).
const WORDS: &[&str] = &[
    "the", "cache", "time", "model", "first", "token", "value", "layer", "data", "node", "file",
    "link", "fast", "slow", "read", "write", "page", "block", "state", "world", "water", "light",
    "story", "house", "paper", "music", "river", "table", "green", "small", "large", "early",
    "level", "point", "field", "order", "power", "money", "night", "study",
];

/// Most classes a prompt file may name.
const MAX_CLASSES: usize = 64;
/// Most prompts read from a file.
const MAX_FILE_PROMPTS: usize = 1_000_000;

#[derive(Debug, Clone)]
pub struct Class {
    pub label: String,
    /// The size asked for, for synthetic prompts.
    pub prompt_tokens: Option<u32>,
    /// For file prompts: the prompts of this class (`prompt` string or `messages` array), taken in turn.
    pub prompts: Vec<Value>,
    /// For a conversations file (ShareGPT): each prompt's answer length, where the file gives one; and
    /// with `--workload multi-turn`, the conversations (taken in turn) instead of prompts.
    pub max_tokens: Vec<Option<u32>>,
    pub conversations: Vec<Vec<Turn>>,
    /// The workload shape of the class's prompts.
    pub shape: Shape,
}

/// The classes of the run, in report order.
pub fn classes(options: &Options) -> Result<Vec<Class>, String> {
    match &options.workload {
        // Each size at each shape; with several shapes the label names it (`8192 shared-prefix`).
        Workload::Synthetic(sizes) => Ok(sizes
            .iter()
            .flat_map(|&tokens| {
                options.shapes.iter().map(move |&shape| Class {
                    label: match options.shapes.len() {
                        1 => format!("{tokens}"),
                        _ => format!("{tokens} {}", shape.kind()),
                    },
                    prompt_tokens: Some(tokens),
                    prompts: Vec::new(),
                    max_tokens: Vec::new(),
                    conversations: Vec::new(),
                    shape,
                })
            })
            .collect()),
        Workload::File(path) if sharegpt::is_sharegpt(path)? => {
            let turns = turns_of(&options.shapes) as usize;
            let (conversations, _) = sharegpt::read(path, turns)?;
            let mut class = Class {
                label: "sharegpt".into(),
                prompt_tokens: None,
                prompts: Vec::new(),
                max_tokens: Vec::new(),
                conversations: Vec::new(),
                shape: options.shapes.first().copied().unwrap_or_default(),
            };
            if turns > 1 {
                class.conversations = conversations;
            } else {
                for turn in conversations.into_iter().flatten() {
                    class.prompts.push(match options.endpoint {
                        Endpoint::Chat => json!([{"role": "user", "content": turn.user}]),
                        Endpoint::Completions => Value::String(turn.user),
                    });
                    class.max_tokens.push(turn.max_tokens);
                }
            }
            Ok(vec![class])
        }
        Workload::File(path) if turns_of(&options.shapes) > 1 => Err(format!(
            "--prompts {}: --workload multi-turn reads conversations from a ShareGPT JSON file (a JSON \
             array), not JSON Lines",
            path.display()
        )),
        Workload::File(path) => read_prompts(path, options.endpoint),
    }
}

fn read_prompts(path: &Path, endpoint: Endpoint) -> Result<Vec<Class>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--prompts {}: {e}", path.display()))?;
    let mut classes: Vec<Class> = Vec::new();
    let mut count = 0usize;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("--prompts {} line {}", path.display(), number + 1);
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("{}: not JSON: {e}", at()))?;
        let prompt = match (value.get("prompt"), value.get("messages")) {
            (Some(Value::String(p)), None) => match endpoint {
                Endpoint::Completions => Value::String(p.clone()),
                Endpoint::Chat => json!([{"role": "user", "content": p}]),
            },
            (None, Some(Value::Array(messages))) if !messages.is_empty() => match endpoint {
                Endpoint::Chat => Value::Array(messages.clone()),
                Endpoint::Completions => {
                    return Err(format!("{}: `messages` needs --endpoint chat", at()));
                }
            },
            _ => {
                return Err(format!(
                    "{}: wants a \"prompt\" string or a non-empty \"messages\" array (not both)",
                    at()
                ))
            }
        };
        let label = match value.get("class") {
            None => "file".to_string(),
            Some(Value::String(c)) if !c.is_empty() && c.len() <= 64 => c.clone(),
            Some(_) => {
                return Err(format!(
                    "{}: \"class\" must be a string of 1-64 characters",
                    at()
                ))
            }
        };
        count += 1;
        if count > MAX_FILE_PROMPTS {
            return Err(format!(
                "--prompts {}: more than {MAX_FILE_PROMPTS} prompts",
                path.display()
            ));
        }
        let known = classes.len();
        match classes.iter().position(|c| c.label == label) {
            Some(index) => classes[index].prompts.push(prompt),
            None if known < MAX_CLASSES => classes.push(Class {
                label,
                prompt_tokens: None,
                prompts: vec![prompt],
                max_tokens: Vec::new(),
                conversations: Vec::new(),
                shape: Shape::Unique,
            }),
            None => return Err(format!("{}: more than {MAX_CLASSES} classes", at())),
        }
    }
    if classes.is_empty() {
        return Err(format!("--prompts {}: no prompts", path.display()));
    }
    Ok(classes)
}

/// A synthetic prompt: `first` (unique per request), then `tokens − 1` words drawn from `rng`.
pub fn synthetic_prompt(first: &str, tokens: u32, rng: &mut impl Rng) -> String {
    let mut prompt = String::with_capacity(tokens as usize * 6 + first.len());
    prompt.push_str(first);
    for _ in 1..tokens {
        prompt.push(' ');
        prompt.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    prompt
}

/// The prompts of a shared-prefix workload (`--workload shared-prefix`): a group's prefix, the same words
/// for every request of that class and group (in every arm and at every level of a sweep), then a suffix
/// unique to the request. The groups are drawn with Zipf popularity.
pub struct SharedPrefix {
    seed: u64,
    suffix_tokens: u32,
    /// The groups' cumulative popularity (group i ∝ 1/(i+1)^s), for drawing one.
    cumulative: Vec<f64>,
}

impl SharedPrefix {
    pub fn new(seed: u64, groups: u32, suffix_tokens: u32, zipf: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=groups)
            .map(|rank| {
                total += f64::from(rank).powf(-zipf);
                total
            })
            .collect();
        SharedPrefix {
            seed,
            suffix_tokens,
            cumulative,
        }
    }

    /// A group, drawn by its popularity.
    pub fn group(&self, rng: &mut impl Rng) -> u32 {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let point = rng.random::<f64>() * total;
        let index = self.cumulative.partition_point(|&c| c <= point);
        index.min(self.cumulative.len().saturating_sub(1)) as u32
    }

    /// The prompt of `tokens` words of class `class`'s group `group`: its prefix (`tokens` less the suffix,
    /// from the group's own generator), then `unique` and the suffix's other words from `rng`.
    pub fn prompt(
        &self,
        class: usize,
        group: u32,
        tokens: u32,
        unique: &str,
        rng: &mut impl Rng,
    ) -> String {
        let prefix_tokens = tokens.saturating_sub(self.suffix_tokens).max(1);
        let mixed = self.seed
            ^ ((class as u64) << 40)
            ^ u64::from(group).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut words = ChaCha8Rng::seed_from_u64(mixed);
        let mut prompt = synthetic_prompt(
            &format!("{:x}-g{class}-{group}", self.seed),
            prefix_tokens,
            &mut words,
        );
        prompt.push(' ');
        prompt.push_str(&synthetic_prompt(unique, tokens - prefix_tokens, rng));
        prompt
    }
}

/// The request body: streamed with usage in the last event unless `--no-stream`. `ignore_eos` (vLLM's
/// sampling parameter) makes every answer `max_tokens` long, so the arms decode the same lengths.
pub fn body(options: &Options, prompt: Value) -> Value {
    let mut body = json!({
        "model": options.model,
        "max_tokens": options.max_tokens,
        "ignore_eos": true,
        "stream": options.stream,
    });
    if options.stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    match (options.endpoint, prompt) {
        (Endpoint::Chat, Value::String(text)) => {
            body["messages"] = json!([{"role": "user", "content": text}])
        }
        (Endpoint::Chat, messages) => body["messages"] = messages,
        (Endpoint::Completions, prompt) => body["prompt"] = prompt,
    }
    body
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_prompts_have_the_words_asked_for_and_differ_from_the_start() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = synthetic_prompt("ab-7", 128, &mut rng);
        assert_eq!(a.split_whitespace().count(), 128);
        assert!(a.starts_with("ab-7 "));
        let b = synthetic_prompt("ab-8", 128, &mut rng);
        assert_ne!(a.split_whitespace().next(), b.split_whitespace().next());
        assert_eq!(synthetic_prompt("ab-1", 1, &mut rng), "ab-1");
    }

    #[test]
    fn shared_prefix_prompts_share_their_groups_prefix_and_differ_after_it() {
        let shared = SharedPrefix::new(9, 4, 8, 1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = shared.prompt(0, 2, 64, "9-1", &mut rng);
        let b = shared.prompt(0, 2, 64, "9-2", &mut rng);
        let words = |p: &str| p.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let (a, b) = (words(&a), words(&b));
        assert_eq!((a.len(), b.len()), (64, 64));
        assert_eq!(a[..56], b[..56], "the group's 56-word prefix");
        assert_eq!((a[56].as_str(), b[56].as_str()), ("9-1", "9-2"));
        let other = words(&shared.prompt(0, 3, 64, "9-3", &mut rng));
        assert_ne!(
            a[0], other[0],
            "another group, another prefix from its first word"
        );
        let other_class = words(&shared.prompt(1, 2, 64, "9-4", &mut rng));
        assert_ne!(a[0], other_class[0]);
        // Zipf 1 over 4 groups: popularity 12/25, 6/25, 4/25, 3/25.
        let mut counts = [0u32; 4];
        for _ in 0..25_000 {
            counts[shared.group(&mut rng) as usize] += 1;
        }
        for (count, expected) in counts.iter().zip([12_000.0, 6_000.0, 4_000.0, 3_000.0]) {
            assert!((f64::from(*count) - expected).abs() < 400.0, "{counts:?}");
        }
        let uniform = SharedPrefix::new(9, 3, 8, 0.0);
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            counts[uniform.group(&mut rng) as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| (9_500..10_500).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn prompt_files_are_read_by_class_and_bad_lines_name_the_line() {
        let dir = std::env::temp_dir().join(format!("kvab-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"a b c\", \"class\": \"short\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n{\"prompt\": \"d\", \"class\": \"short\"}\n",
        )
        .unwrap();
        let classes = read_prompts(&path, Endpoint::Chat).unwrap();
        assert_eq!(classes.len(), 2);
        assert_eq!(classes[0].label, "short");
        assert_eq!(classes[0].prompts.len(), 2);
        assert_eq!(classes[1].label, "file");
        let error = read_prompts(&path, Endpoint::Completions).unwrap_err();
        assert!(
            error.contains("line 3") && error.contains("messages"),
            "{error}"
        );
        std::fs::write(&path, "{\"prompt\": 3}\n").unwrap();
        let error = read_prompts(&path, Endpoint::Chat).unwrap_err();
        assert!(error.contains("line 1"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
