//! The workload's prefix reuse: how many prompt tokens each arm was sent again, by construction. A
//! shared-prefix workload gives each request a group's prefix; a request whose group the same arm was
//! sent before (in this run, in measured order) repeats that prefix, which a prefix cache large enough
//! can serve. Pure: the cells and the outcomes in, the figures out.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::outcome::Outcome;

/// The shape of the synthetic prompts (`kvab experiment --workload`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Shape {
    /// Every prompt unique from its first word: no prefix cache can serve one from another.
    #[default]
    Unique,
    /// Each prompt a group's prefix and a unique suffix of `suffix_tokens`; the groups of a class drawn
    /// with Zipf popularity (`zipf` the exponent, 0: uniform).
    SharedPrefix {
        groups: u32,
        suffix_tokens: u32,
        zipf: f64,
    },
    /// Conversations of `turns` turns, each conversation on one arm: turn k sends a new user message of the
    /// class's size with the conversation so far (the earlier messages and the server's answers), after
    /// `think_time_s` seconds.
    MultiTurn { turns: u32, think_time_s: f64 },
}

impl Shape {
    /// `unique`, `shared-prefix`, `multi-turn`: how labels name the shape.
    pub fn kind(&self) -> &'static str {
        match self {
            Shape::Unique => "unique",
            Shape::SharedPrefix { .. } => "shared-prefix",
            Shape::MultiTurn { .. } => "multi-turn",
        }
    }

    /// `shared-prefix: 16 groups per class (Zipf 1), unique suffix of 64 tokens`, or `unique prompts`.
    pub fn text(&self) -> String {
        match *self {
            Shape::Unique => "unique prompts (no prefix shared)".into(),
            Shape::SharedPrefix {
                groups,
                suffix_tokens,
                zipf,
            } => format!(
                "shared-prefix: {groups} groups per class (Zipf {zipf}), unique suffix of {suffix_tokens} tokens"
            ),
            Shape::MultiTurn {
                turns,
                think_time_s,
            } => format!(
                "multi-turn: conversations of {turns} turns, {think_time_s} s between them, each on one arm \
                 (the unit of randomization), each turn a cell"
            ),
        }
    }

    /// Requests per unit of randomization: a conversation's turns, else 1.
    pub fn turns(&self) -> u32 {
        match *self {
            Shape::MultiTurn { turns, .. } => turns,
            _ => 1,
        }
    }

    /// Whether the shape fits synthetic prompts of these sizes (`None`: prompts from a file); why not.
    pub fn check(&self, sizes: Option<&[u32]>) -> Result<(), String> {
        if let Shape::MultiTurn {
            turns,
            think_time_s,
        } = *self
        {
            // Synthetic conversations, or a conversations file's (checked when it is read).
            if !(2..=64).contains(&turns) || !(0.0..=3600.0).contains(&think_time_s) {
                return Err(
                    "multi-turn wants 2 to 64 turns and a think time of 0 to 3600 s".into(),
                );
            }
            return Ok(());
        }
        let Shape::SharedPrefix {
            groups,
            suffix_tokens,
            zipf,
        } = *self
        else {
            return Ok(());
        };
        let Some(sizes) = sizes else {
            return Err(
                "shared-prefix builds synthetic prompts; prompts from a file have their own".into(),
            );
        };
        let smallest = sizes.iter().min().copied().unwrap_or(0);
        if suffix_tokens >= smallest {
            return Err(format!(
                "a suffix of {suffix_tokens} tokens leaves no prefix in the class of {smallest} tokens: it \
                 must be shorter than every class"
            ));
        }
        if !(1..=100_000).contains(&groups) || !(0.0..=4.0).contains(&zipf) {
            return Err(
                "shared-prefix wants 1 to 100000 groups and a Zipf exponent from 0 to 4".into(),
            );
        }
        Ok(())
    }
}

/// The report's `workload`: the run's shapes and, for the cells of a shared-prefix or multi-turn shape,
/// their reuse.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    /// One, or several (each class at each shape: the cells of a class × workload grid).
    pub shapes: Vec<Shape>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reuse: Vec<Reuse>,
}

/// Requests per unit of randomization over a run's shapes (a multi-turn shape is never mixed with another).
pub fn turns_of(shapes: &[Shape]) -> u32 {
    shapes.iter().map(Shape::turns).max().unwrap_or(1)
}

impl Workload {
    /// The shapes, `; `-separated.
    pub fn text(&self) -> String {
        let texts: Vec<String> = self.shapes.iter().map(Shape::text).collect();
        texts.join("; ")
    }

    /// Per cell, `8192 (prefix 8128 tokens): nvlink 90/100 repeated (88.6 % of tokens), fs ...`: the reuse
    /// by construction.
    pub fn reuse_lines(&self) -> Vec<String> {
        self.reuse
            .iter()
            .map(|r| {
                let arms: Vec<String> = r
                    .arms
                    .iter()
                    .map(|(arm, a)| {
                        format!(
                            "{arm} {}/{} repeated ({:.1} % of tokens)",
                            a.repeated,
                            a.requests,
                            100.0 * a.shared_fraction
                        )
                    })
                    .collect();
                let prefix = match r.prefix_tokens {
                    0 => String::new(),
                    tokens => format!(" (prefix {tokens} tokens)"),
                };
                format!("{}{prefix}: {}", r.class, arms.join(", "))
            })
            .collect()
    }
}

/// One cell's reuse.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reuse {
    /// The cell's label (as the report's classes).
    pub class: String,
    /// The shared prefix's tokens by construction (the class's size less the suffix); 0 for a conversation's
    /// turns, whose shared part is the conversation so far.
    pub prefix_tokens: u32,
    pub arms: BTreeMap<String, ArmReuse>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ArmReuse {
    /// Measured requests with a group.
    pub requests: u64,
    /// Of them, those whose group the arm was sent before.
    pub repeated: u64,
    /// `repeated` × the prefix's tokens.
    pub shared_tokens: u64,
    /// `shared_tokens` over the requests' prompt tokens as built.
    pub shared_fraction: f64,
}

/// A cell of the run: its label, its workload class (the same at every level of a sweep) and the size
/// asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub label: String,
    pub class: String,
    pub prompt_tokens: Option<u32>,
    /// A multi-turn conversation's turn (1-based).
    pub turn: Option<u32>,
    /// The cell's workload shape.
    pub shape: Shape,
}

/// The reuse of every cell of a shared-prefix or multi-turn shape (none for unique prompts). `outcomes` in
/// measured order (a sweep's levels one after the other: an arm's cache carries over).
pub fn reuse(cells: &[Cell], arms: &[String], outcomes: &[Outcome]) -> Vec<Reuse> {
    let mut out: Vec<Reuse> = cells
        .iter()
        .map(|cell| Reuse {
            class: cell.label.clone(),
            prefix_tokens: match cell.shape {
                Shape::SharedPrefix { suffix_tokens, .. } => cell
                    .prompt_tokens
                    .unwrap_or(0)
                    .saturating_sub(suffix_tokens),
                _ => 0,
            },
            arms: arms
                .iter()
                .map(|arm| (arm.clone(), ArmReuse::default()))
                .collect(),
        })
        .collect();
    // Shared-prefix: the groups each arm was sent, per workload class. Multi-turn: per cell and arm, the
    // prompt tokens the server counted.
    let mut seen: HashSet<(usize, &str, u32)> = HashSet::new();
    let mut sent: BTreeMap<(usize, &str), u64> = BTreeMap::new();
    for o in outcomes {
        let (Some(cell), Some(arm)) = (cells.get(o.class), arms.get(o.assigned)) else {
            continue;
        };
        let Some(counts) = out.get_mut(o.class).and_then(|r| r.arms.get_mut(arm)) else {
            continue;
        };
        match cell.shape {
            Shape::Unique => {}
            Shape::SharedPrefix { .. } => {
                let Some(group) = o.group else { continue };
                let repeated = !seen.insert((o.assigned, cell.class.as_str(), group));
                counts.requests += 1;
                counts.repeated += u64::from(repeated);
                let size = u64::from(cell.prompt_tokens.unwrap_or(0));
                *sent.entry((o.class, arm.as_str())).or_default() += size;
            }
            Shape::MultiTurn { .. } => {
                counts.requests += 1;
                let later = cell.turn.is_some_and(|t| t > 1);
                counts.repeated += u64::from(later);
                // A file's conversations have messages of their own lengths: what a turn re-sent is not
                // known from its prompt tokens, only that it re-sent the conversation (`repeated`).
                if let (Some(prompt), Some(size)) = (o.prompt_tokens, cell.prompt_tokens) {
                    *sent.entry((o.class, arm.as_str())).or_default() += prompt;
                    if later {
                        counts.shared_tokens += prompt.saturating_sub(u64::from(size));
                    }
                }
            }
        }
    }
    for (class, reuse) in out.iter_mut().enumerate() {
        let prefix = u64::from(reuse.prefix_tokens);
        for (arm, counts) in reuse.arms.iter_mut() {
            if prefix > 0 {
                counts.shared_tokens = counts.repeated * prefix;
            }
            let total = sent.get(&(class, arm.as_str())).copied().unwrap_or(0);
            counts.shared_fraction = if total > 0 {
                counts.shared_tokens as f64 / total as f64
            } else {
                0.0
            };
        }
    }
    // Unique prompts share nothing by construction: no entry.
    out.into_iter()
        .zip(cells)
        .filter(|(_, cell)| cell.shape != Shape::Unique)
        .map(|(reuse, _)| reuse)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_group_sent_again_to_the_same_arm_repeats_its_prefix_across_levels() {
        let shape = Shape::SharedPrefix {
            groups: 4,
            suffix_tokens: 24,
            zipf: 1.0,
        };
        let cell = |label: &str| Cell {
            label: label.into(),
            class: "1024".into(),
            prompt_tokens: Some(1024),
            turn: None,
            shape,
        };
        let cells = [cell("1024 @ c=1"), cell("1024 @ c=8")];
        let arms = ["nvlink".to_string(), "fs".to_string()];
        let sent = |class, assigned, group| Outcome {
            class,
            assigned,
            group: Some(group),
            ..Outcome::default()
        };
        // Group 1 to nvlink twice (once per level), to fs once; group 2 to fs once.
        let outcomes = [sent(0, 0, 1), sent(0, 1, 1), sent(1, 0, 1), sent(1, 1, 2)];
        let reuse = reuse(&cells, &arms, &outcomes);
        assert_eq!(reuse[0].prefix_tokens, 1000);
        assert_eq!(reuse[0].arms["nvlink"].repeated, 0);
        assert_eq!(reuse[1].arms["nvlink"].repeated, 1);
        assert_eq!(reuse[1].arms["nvlink"].shared_tokens, 1000);
        assert!((reuse[1].arms["nvlink"].shared_fraction - 1000.0 / 1024.0).abs() < 1e-12);
        assert_eq!(reuse[1].arms["fs"].repeated, 0);
        let unique = cells.map(|c| Cell {
            shape: Shape::Unique,
            ..c
        });
        assert!(super::reuse(&unique, &arms, &outcomes).is_empty());
    }
}
