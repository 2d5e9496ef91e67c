//! The load: requests generated in assignment order, sent closed-loop (a fixed number in flight) or
//! open-loop (Poisson arrivals), each measured by `execute`. Outcomes go to the collector with their
//! request number; every loop here is bounded by the request budget, the deadline or the stop flag.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use kvab_serve::client::{HttpClient, Request};

use super::assign::Assigner;
use super::conversation::{self, Conversation};
use super::measure::{execute, Exchange, Outcome};
use super::options::{Load, Options};
use super::sharegpt::Turn;
use super::workload::{self, Class, SharedPrefix};
use kvab_judge::reuse::{turns_of, Shape};

/// One unit of randomization to send: a request, or a multi-turn conversation.
pub struct Job {
    /// 0-based, in assignment order within its load level; the first `warmup` are warm-up.
    pub number: u64,
    /// The cell of its (first) request: the class, after those of the earlier load levels (and a
    /// conversation's later turns are the cells after it).
    pub class: usize,
    pub arm: usize,
    /// A shared-prefix workload's group.
    pub group: Option<u32>,
    pub work: Work,
}

pub enum Work {
    Request(Request),
    Conversation(Conversation),
}

/// Makes the jobs of one load level in order: assignment, prompt, body. Shared by the senders behind a
/// mutex.
pub struct Generator {
    assigner: Assigner,
    rng: ChaCha8Rng,
    next: u64,
    total: u64,
    /// The load level's index: its cells come after the earlier levels' and its prompts differ from theirs.
    level: u64,
    /// A shared-prefix workload's prompts, and the generator of its groups.
    shared: Option<(SharedPrefix, ChaCha8Rng)>,
    /// Requests per unit (a conversation's turns, else 1) and, for conversations, the think time.
    turns: usize,
    think: Option<Duration>,
    /// Per class, the next file prompt.
    cursor: Vec<usize>,
    classes: Vec<Class>,
    url: String,
    options: Options,
}

impl Generator {
    /// The generator of load level `level` (0 for a run of one level: its sequence is the seed's alone).
    pub fn new(options: &Options, classes: Vec<Class>, gateway: &str, level: u64) -> Self {
        // Each level draws its own assignment and prompts from the seed and its index.
        let seed = options.seed ^ level.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Generator {
            assigner: Assigner::new(
                seed,
                classes.len(),
                options.arms.len(),
                options.block as usize,
            ),
            // Prompts draw from their own stream, so the assignment is the seed's whatever the prompts are.
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6b76_6162_7072_6f6d),
            next: 0,
            total: options.warmup + options.requests,
            level,
            turns: turns_of(&options.shapes) as usize,
            think: options.shapes.iter().find_map(|shape| match *shape {
                Shape::MultiTurn { think_time_s, .. } => {
                    Some(Duration::from_secs_f64(think_time_s))
                }
                _ => None,
            }),
            shared: options.shapes.iter().find_map(|shape| match *shape {
                Shape::SharedPrefix {
                    groups,
                    suffix_tokens,
                    zipf,
                } => Some((
                    SharedPrefix::new(options.seed, groups, suffix_tokens, zipf),
                    ChaCha8Rng::seed_from_u64(seed ^ 0x6b76_6162_6772_6f75),
                )),
                _ => None,
            }),
            // A file's prompts go on from level to level (each level from where the one before would
            // have gone on), not from the start again.
            cursor: vec![
                level as usize * (options.warmup + options.requests) as usize;
                classes.len()
            ],
            classes,
            url: format!("{gateway}{}", options.path),
            options: options.clone(),
        }
    }

    pub fn next_job(&mut self) -> Option<Job> {
        if self.next >= self.total {
            return None;
        }
        let number = self.next;
        self.next += 1;
        let (class, arm) = self.assigner.next();
        let spec = self.classes.get(class)?;
        let mut group = None;
        let unique = format!(
            "{:x}-{}",
            self.options.seed,
            self.level * self.total + number
        );
        let arm_name = self.options.arms.get(arm)?;
        let cell = self.level as usize * self.classes.len() * self.turns + class * self.turns;
        let job = |work, group| Job {
            number,
            class: cell,
            arm,
            group,
            work,
        };
        if let Some(think) = self.think {
            let users = match spec.prompt_tokens {
                // Each turn's message unique from its first word; the conversation so far is its prefix.
                Some(tokens) => (0..self.turns)
                    .map(|turn| Turn {
                        user: workload::synthetic_prompt(
                            &format!("{unique}-t{}", turn + 1),
                            tokens,
                            &mut self.rng,
                        ),
                        max_tokens: None,
                    })
                    .collect(),
                None => {
                    let cursor = self.cursor.get_mut(class)?;
                    let taken = spec
                        .conversations
                        .get(*cursor % spec.conversations.len().max(1))?;
                    *cursor += 1;
                    taken.clone()
                }
            };
            let conversation = Conversation {
                users,
                template: workload::body(&self.options, Value::Array(Vec::new())),
                url: self.url.clone(),
                arm: arm_name.clone(),
                think,
            };
            return Some(job(Work::Conversation(conversation), None));
        }
        let mut max_tokens = None;
        let prompt = match spec.prompt_tokens {
            // The seed in the prompt's first unique word keeps two runs' prompts apart too, the number
            // (counted over the levels) two requests of one run.
            Some(tokens) => Value::String(match (&mut self.shared, spec.shape) {
                (Some((shared, groups)), Shape::SharedPrefix { .. }) => {
                    let drawn = shared.group(groups);
                    group = Some(drawn);
                    shared.prompt(class, drawn, tokens, &unique, &mut self.rng)
                }
                _ => workload::synthetic_prompt(&unique, tokens, &mut self.rng),
            }),
            None => {
                let cursor = self.cursor.get_mut(class)?;
                let taken = *cursor % spec.prompts.len().max(1);
                *cursor += 1;
                max_tokens = spec.max_tokens.get(taken).copied().flatten();
                spec.prompts.get(taken)?.clone()
            }
        };
        let mut body = workload::body(&self.options, prompt);
        if let Some(max_tokens) = max_tokens {
            // The answer's length a conversations file gives.
            body["max_tokens"] = max_tokens.into();
        }
        let request =
            Request::post_json(self.url.clone(), &body).with_header(&self.options.header, arm_name);
        Some(job(Work::Request(request), group))
    }
}

/// Sends the job: its request, or its conversation's turns one after the other; each outcome goes to
/// `outcomes` with its measured number (a conversation's turn k: the job's number × turns + k). False once
/// the collector is gone.
async fn perform(
    run: &Run,
    job: &Job,
    exchange: &Exchange,
    outcomes: &mpsc::UnboundedSender<(u64, Outcome)>,
) -> bool {
    let emit = |turn: u64, outcome| {
        outcomes
            .send((job.number * exchange.turns + turn, outcome))
            .is_ok()
    };
    match &job.work {
        Work::Request(request) => {
            let unmeasured = Outcome {
                class: job.class,
                assigned: job.arm,
                group: job.group,
                ..Outcome::default()
            };
            let (outcome, _) = execute(&run.client, request, unmeasured, exchange, false).await;
            emit(0, outcome)
        }
        Work::Conversation(conversation) => {
            let first = (job.class, job.arm);
            let sent =
                conversation::converse(&run.client, first, conversation, exchange, emit).await;
            // `take_job` counted the conversation's first request.
            let later = sent.map_or(0, |n| n.saturating_sub(1));
            run.sent.fetch_add(later, Ordering::Relaxed);
            sent.is_some()
        }
    }
}

/// What the senders share.
pub struct Run {
    pub generator: Mutex<Generator>,
    pub client: HttpClient,
    pub stop: AtomicBool,
    pub deadline: Instant,
    pub sent: AtomicU64,
    /// Open loop: arrivals skipped because --max-in-flight requests were in flight.
    pub skipped: AtomicU64,
    in_flight: AtomicUsize,
    /// When the first measured request (the first after the warm-up) was taken.
    pub measuring_since: OnceLock<Instant>,
    warmup: u64,
}

impl Run {
    pub fn new(
        generator: Generator,
        client: HttpClient,
        deadline: Instant,
        warmup: u64,
    ) -> Arc<Self> {
        Arc::new(Run {
            generator: Mutex::new(generator),
            client,
            stop: AtomicBool::new(false),
            deadline,
            sent: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            measuring_since: OnceLock::new(),
            warmup,
        })
    }

    fn take_job(&self) -> Option<Job> {
        if self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline {
            return None;
        }
        let job = self.generator.lock().ok()?.next_job()?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        if job.number == self.warmup {
            let _ = self.measuring_since.set(Instant::now());
        }
        Some(job)
    }
}

/// Starts the senders; each outcome is sent on `outcomes` with its request number. The channel closes
/// when the budget or the deadline is reached (or `stop` is set) and the requests in flight are done.
pub fn start(
    run: Arc<Run>,
    options: &Options,
    load: &Load,
    outcomes: mpsc::UnboundedSender<(u64, Outcome)>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let exchange = Exchange {
        arms: options.arms.clone().into(),
        header: options.header.as_str().into(),
        stream: options.stream,
        turns: u64::from(turns_of(&options.shapes)),
    };
    match *load {
        Load::Closed { concurrency } => {
            for _ in 0..concurrency {
                let (run, outcomes, exchange) = (run.clone(), outcomes.clone(), exchange.clone());
                tasks.spawn(async move {
                    while let Some(job) = run.take_job() {
                        if !perform(&run, &job, &exchange, &outcomes).await {
                            return;
                        }
                    }
                });
            }
        }
        Load::Open {
            rate,
            max_in_flight,
        } => {
            let seed = options.seed ^ 0x6b76_6162_6172_7269;
            tasks.spawn(async move {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let mut senders = JoinSet::new();
                let mut next_at = Instant::now();
                loop {
                    // Exponential gaps: a Poisson process at `rate`; late arrivals go at once (the schedule
                    // is absolute, so the mean rate holds).
                    let uniform: f64 = rng.random::<f64>();
                    next_at += Duration::from_secs_f64(-(1.0 - uniform).ln() / rate);
                    tokio::time::sleep_until(next_at.min(run.deadline)).await;
                    while senders.try_join_next().is_some() {}
                    if run.in_flight.load(Ordering::Relaxed) >= max_in_flight as usize {
                        if run.stop.load(Ordering::Relaxed) || Instant::now() >= run.deadline {
                            break;
                        }
                        run.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let Some(job) = run.take_job() else { break };
                    run.in_flight.fetch_add(1, Ordering::Relaxed);
                    let (run, outcomes, exchange) =
                        (run.clone(), outcomes.clone(), exchange.clone());
                    senders.spawn(async move {
                        perform(&run, &job, &exchange, &outcomes).await;
                        run.in_flight.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                while senders.join_next().await.is_some() {}
            });
        }
    }
    tasks
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kvab_judge::requests::{analyze, Design};
    use kvab_serve::client::one_shot::{serve_once, Then};

    const TAGGED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        transfer-encoding: chunked\r\nx-kv-backend: nvlink\r\n\r\n\
        30\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\r\n";

    const ARMS: [&str; 2] = ["fs", "nvlink"];

    /// The outcome of one request assigned to `nvlink` answered as `then` says.
    async fn outcome_of(then: Then, max_time: Duration) -> Outcome {
        outcome_for(1, then, max_time).await
    }

    async fn outcome_for(arm: usize, then: Then, max_time: Duration) -> Outcome {
        let url = serve_once(then).await;
        let request = Request::get(url).with_header("x-kv-backend", ARMS[arm]);
        let unmeasured = Outcome {
            assigned: arm,
            ..Outcome::default()
        };
        let exchange = Exchange {
            arms: ARMS.map(String::from).into(),
            header: "x-kv-backend".into(),
            stream: true,
            turns: 1,
        };
        let client = HttpClient::new(max_time);
        execute(&client, &request, unmeasured, &exchange, false)
            .await
            .0
    }

    #[tokio::test]
    async fn a_stream_cut_after_its_tagged_headers_is_that_arms_transport_error() {
        let outcome = outcome_of(Then::Answer(TAGGED_HEAD.to_vec()), Duration::from_secs(5)).await;
        assert_eq!(outcome.served, Some(1));
        assert_eq!(outcome.status, Some(200));
        assert_eq!(outcome.error.as_deref(), Some("transport"));
        assert!(!outcome.counts());
    }

    #[tokio::test]
    async fn a_stream_stalled_after_its_tagged_headers_is_that_arms_timeout() {
        let outcome = outcome_of(
            Then::Stall(TAGGED_HEAD.to_vec()),
            Duration::from_millis(300),
        )
        .await;
        assert_eq!(outcome.served, Some(1));
        assert_eq!(outcome.status, Some(200));
        assert_eq!(outcome.error.as_deref(), Some("timeout"));
    }

    #[tokio::test]
    async fn a_tagged_error_status_cut_short_keeps_its_status() {
        let head = b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\
            x-kv-backend: fs\r\n\r\n5\r\nno he";
        let outcome = outcome_of(Then::Answer(head.to_vec()), Duration::from_secs(5)).await;
        assert_eq!(outcome.served, Some(0));
        assert_eq!(outcome.error.as_deref(), Some("status 503"));
    }

    #[tokio::test]
    async fn a_connection_closed_before_any_header_stays_untagged() {
        let outcome = outcome_of(Then::Answer(b"".to_vec()), Duration::from_secs(5)).await;
        assert_eq!(outcome.served, None);
        assert_eq!(outcome.status, None);
        assert_eq!(outcome.error.as_deref(), Some("transport"));
    }

    #[tokio::test]
    async fn an_arm_whose_streams_break_off_is_not_a_sample_ratio_mismatch() {
        const FS_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            transfer-encoding: chunked\r\nx-kv-backend: fs\r\n\r\n\
            30\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\r\n\
            e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";
        let mut outcomes = Vec::new();
        // Twelve each: with no nvlink answer, 12 against 0 is a mismatch (p = 0.0005).
        for _ in 0..12 {
            outcomes.push(
                outcome_for(0, Then::Answer(FS_ANSWER.to_vec()), Duration::from_secs(5)).await,
            );
            outcomes
                .push(outcome_of(Then::Answer(TAGGED_HEAD.to_vec()), Duration::from_secs(5)).await);
        }
        let design = Design {
            arms: ARMS.map(String::from).to_vec(),
            classes: vec!["128".into()],
            prompt_tokens: vec![Some(128)],
            stream: true,
            look_alpha: 0.05,
            min_effect: 0.05,
            srm_threshold: 0.001,
            max_time_ms: 5_000.0,
            tail_margin: 0.25,
            error_margin: 0.02,
            stratum: kvab_judge::requests::STRATUM,
            unit_start: Vec::new(),
        };
        let analysis = analyze(&design, &outcomes);
        let a = &analysis.assignment;
        assert_eq!(
            (a.answered["fs"], a.answered["nvlink"], a.untagged),
            (12, 12, 0)
        );
        assert!(a.srm_ok);
        let errors = &analysis.errors[0].arms;
        assert_eq!((errors["fs"].errors, errors["nvlink"].errors), (0, 12));
    }
}
