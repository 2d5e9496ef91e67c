//! The shapes of the workload and the load levels the flags ask for, checked together.

use kvab_judge::reuse::{turns_of, Shape};
use kvab_judge::sweep::MAX_LEVELS;

use super::super::records::MAX_MEASURED;
use super::{Endpoint, ExperimentArgs, Load, Until, Workload, WorkloadKind};

/// `--workload`'s shapes, each once, checked against the classes' sizes (`workload`).
pub(super) fn shapes(args: &ExperimentArgs, workload: &Workload) -> Result<Vec<Shape>, String> {
    let mut kinds = args.workload.clone();
    kinds.sort_unstable();
    kinds.dedup();
    let shapes: Vec<Shape> = kinds
        .iter()
        .map(|kind| match kind {
            WorkloadKind::Unique => Shape::Unique,
            WorkloadKind::SharedPrefix => Shape::SharedPrefix {
                groups: args.prefix_groups,
                suffix_tokens: args.suffix_tokens,
                zipf: args.zipf,
            },
            WorkloadKind::MultiTurn => Shape::MultiTurn {
                turns: args.turns,
                think_time_s: args.think_time,
            },
        })
        .collect();
    let multi_turn = kinds.contains(&WorkloadKind::MultiTurn);
    if multi_turn && (kinds.len() > 1 || args.endpoint != Endpoint::Chat) {
        return Err(
            "--workload multi-turn sends conversations: it goes alone (its unit is the \
                    conversation) and needs --endpoint chat"
                .into(),
        );
    }
    let synthetic = match &workload {
        Workload::Synthetic(sizes) => Some(sizes.as_slice()),
        Workload::File(_) if shapes.len() > 1 => {
            return Err("--workload: prompts from a file are one workload".into())
        }
        Workload::File(_) => None,
    };
    for shape in &shapes {
        shape
            .check(synthetic)
            .map_err(|e| format!("--workload: {e}"))?;
    }
    Ok(shapes)
}

/// The load levels, lightest first, each once, with the flags that depend on them checked.
pub(super) fn levels(args: &ExperimentArgs, shapes: &[Shape]) -> Result<Vec<Load>, String> {
    // The levels lightest first, each once: the knee is read upwards from the lightest.
    let mut concurrency = args.concurrency.clone();
    concurrency.sort_unstable();
    concurrency.dedup();
    let mut rates = args.rate.clone();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let max_in_flight = args.max_in_flight;
    let levels: Vec<Load> = match rates.is_empty() {
        true => concurrency
            .into_iter()
            .map(|concurrency| Load::Closed { concurrency })
            .collect(),
        false => rates
            .into_iter()
            .map(|rate| Load::Open {
                rate,
                max_in_flight,
            })
            .collect(),
    };
    if levels.len() > MAX_LEVELS {
        return Err(format!(
            "{} load levels: a sweep has at most {MAX_LEVELS}",
            levels.len()
        ));
    }
    if levels.len() > 1 && args.until == Until::Decided {
        return Err(
            "--until decided stops one run when it is decided; a load sweep runs every level to its \
             budget (use --until budget)"
                .into(),
        );
    }
    let per_request = args
        .slo
        .is_some_and(|s| s.ttft_ms.is_some() || s.itl_ms.is_some());
    if args.no_stream && per_request {
        return Err("--slo: ttft and itl need streamed answers; with --no-stream only e2e".into());
    }
    // Measured requests of the whole run: each level's, each conversation's turns.
    let turns = u64::from(turns_of(shapes));
    if args.requests * turns * levels.len() as u64 > MAX_MEASURED {
        return Err(format!(
            "--requests {} × {turns} turn(s) × {} level(s) is more than the {MAX_MEASURED} measured requests \
             a run may have",
            args.requests,
            levels.len()
        ));
    }
    if args.slo.is_some() && levels.len() < 2 {
        return Err(
            "--slo applies to a load sweep: give several --concurrency or --rate levels".into(),
        );
    }
    Ok(levels)
}
