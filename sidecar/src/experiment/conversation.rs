//! A multi-turn conversation (`--workload multi-turn`): its turns sent one after the other on its one arm,
//! each with the conversation so far (the earlier user messages and the server's answers), after the think
//! time. The conversation is the unit of randomization; each turn is measured as a request of its turn's
//! cell. A turn that fails ends the conversation: its later turns are counted as that arm's failures
//! (`conversation broken at turn k`), so that no assigned turn goes uncounted.

use std::time::Duration;

use serde_json::{json, Value};

use kvab_serve::client::{HttpClient, Request};

use super::measure::{execute, Exchange, Outcome};
use super::sharegpt::Turn;

pub struct Conversation {
    /// Each turn's user message, and its answer's length where a conversations file gives one (else the
    /// template's `max_tokens`).
    pub users: Vec<Turn>,
    /// The request body without its messages.
    pub template: Value,
    pub url: String,
    /// The assigned arm's name (the arm header's value).
    pub arm: String,
    /// The wait between an answer and the next turn.
    pub think: Duration,
}

/// Sends the conversation's turns; its first turn's cell and its arm are `first`; `emit(k, outcome)` takes
/// turn k's outcome (0-based) and says whether to go on. The requests sent, or `None` when `emit` said
/// stop.
pub async fn converse(
    client: &HttpClient,
    (class, arm): (usize, usize),
    conversation: &Conversation,
    exchange: &Exchange,
    mut emit: impl FnMut(u64, Outcome) -> bool,
) -> Option<u64> {
    let mut messages: Vec<Value> = Vec::with_capacity(2 * conversation.users.len());
    let turns = conversation.users.len();
    for (turn, user) in conversation.users.iter().enumerate() {
        if turn > 0 && !conversation.think.is_zero() {
            tokio::time::sleep(conversation.think).await;
        }
        messages.push(json!({"role": "user", "content": user.user}));
        let mut body = conversation.template.clone();
        body["messages"] = Value::Array(messages.clone());
        if let Some(max_tokens) = user.max_tokens {
            body["max_tokens"] = max_tokens.into();
        }
        let request = Request::post_json(conversation.url.clone(), &body)
            .with_header(&exchange.header, &conversation.arm);
        let unmeasured = Outcome {
            class: class + turn,
            assigned: arm,
            ..Outcome::default()
        };
        let (outcome, answer) = execute(client, &request, unmeasured, exchange, true).await;
        let broken = outcome.error.is_some();
        if !emit(turn as u64, outcome) {
            return None;
        }
        if broken {
            for later in turn + 1..turns {
                let never_sent = Outcome {
                    class: class + later,
                    assigned: arm,
                    error: Some(format!("conversation broken at turn {}", turn + 1)),
                    ..Outcome::default()
                };
                if !emit(later as u64, never_sent) {
                    return None;
                }
            }
            return Some(turn as u64 + 1);
        }
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    Some(turns as u64)
}
