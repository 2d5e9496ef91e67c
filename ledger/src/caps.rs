//! The ledger's caps (`reports.max_reporters`, `reports.max_entries`): what a report would add, whether it
//! fits, and which idle reporters to retire to make room.

use std::collections::HashSet;
use std::sync::Arc;

use kvab_contract::report::Report;

use super::{Growth, Ledger, Limits, MAX_RETIRED};

impl Ledger {
    /// Reporters whose last report is older than `before_ms` (a ledger saved before report times were
    /// kept counts as seen at `loaded_ms`).
    pub fn idle_reporters(&self, before_ms: u64, loaded_ms: u64) -> Vec<String> {
        self.reporters
            .iter()
            .filter(|(_, r)| {
                let seen = if r.last_seen_ms == 0 {
                    loaded_ms
                } else {
                    r.last_seen_ms
                };
                seen < before_ms
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Retires reporters: their totals go, their counts stay in `routed`, their ids are remembered (the
    /// newest `MAX_RETIRED`) so that a report from one of them again is a starting point.
    pub fn retire(&mut self, ids: &[String], at_ms: u64) {
        for id in ids {
            if let Some(gone) = self.reporters.remove(id) {
                self.entries = self.entries.saturating_sub(gone.totals.len());
                self.retired.insert(id.clone(), at_ms);
            }
        }
        if self.retired.len() > MAX_RETIRED {
            let mut by_age: Vec<(u64, String)> = self
                .retired
                .iter()
                .map(|(id, at)| (*at, id.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, id) in by_age.iter().take(self.retired.len() - MAX_RETIRED) {
                self.retired.remove(id);
            }
        }
        // Keys no reporter holds any more (the set's own reference is the last).
        self.keys.retain(|key| Arc::strong_count(key) > 1);
    }

    /// What `report` would add if applied: nothing for a repeat or an older report.
    pub(crate) fn growth(&self, report: &Report) -> Growth {
        let Some(reporter) = self.reporters.get(&report.reporter) else {
            let mut keys: HashSet<(&str, &str, &str, &str)> = HashSet::new();
            for t in &report.totals {
                keys.insert((&t.requested, &t.served, &t.endpoint, &t.code_class));
            }
            return Growth {
                reporters: 1,
                entries: keys.len(),
            };
        };
        if report.sequence <= reporter.sequence {
            return Growth::default();
        }
        let entries = report
            .totals
            .iter()
            .filter(|t| {
                let key = (
                    t.requested.clone(),
                    t.served.clone(),
                    t.endpoint.clone(),
                    t.code_class.clone(),
                );
                !reporter.totals.contains_key(&key)
            })
            .count();
        Growth {
            reporters: 0,
            entries,
        }
    }

    /// What `report` would add when it may not fit under `limits`; `None` when it fits whatever its
    /// keys are (its totals counted as all new), the common case, which then reads none of them.
    pub fn growth_past(&self, report: &Report, limits: &Limits) -> Option<Growth> {
        let most = Growth {
            reporters: usize::from(!self.reporters.contains_key(&report.reporter)),
            entries: report.totals.len(),
        };
        if self.fits(most, limits) {
            return None;
        }
        Some(self.growth(report)).filter(|growth| !self.fits(*growth, limits))
    }

    /// Whether `growth` fits under `limits` as the ledger is.
    pub fn fits(&self, growth: Growth, limits: &Limits) -> bool {
        (growth.reporters == 0 || self.reporters.len() < limits.max_reporters)
            && self.entries.saturating_add(growth.entries) <= limits.max_entries
    }

    /// The reporters to retire, longest idle first and only those idle since before `before_ms`
    /// (seen at `loaded_ms` when saved before report times were kept), for `growth` to fit under
    /// `limits`; `None` when retiring all of them would not make room. `keep` is never picked.
    pub fn make_room(
        &self,
        growth: Growth,
        limits: &Limits,
        before_ms: u64,
        loaded_ms: u64,
        keep: &str,
    ) -> Option<Vec<String>> {
        let slots = if growth.reporters > 0 && self.reporters.len() >= limits.max_reporters {
            self.reporters.len() + 1 - limits.max_reporters
        } else {
            0
        };
        let excess =
            (self.entries.saturating_add(growth.entries)).saturating_sub(limits.max_entries);
        if slots == 0 && excess == 0 {
            return Some(Vec::new());
        }
        let mut idle: Vec<(u64, &String, usize)> = self
            .reporters
            .iter()
            .filter(|(id, _)| id.as_str() != keep)
            .map(|(id, r)| {
                let seen = if r.last_seen_ms == 0 {
                    loaded_ms
                } else {
                    r.last_seen_ms
                };
                (seen, id, r.totals.len())
            })
            .filter(|(seen, _, _)| *seen < before_ms)
            .collect();
        idle.sort_unstable();
        let (mut freed_slots, mut freed) = (0, 0);
        let mut picked = Vec::new();
        for (_, id, entries) in idle {
            if freed_slots >= slots && freed >= excess {
                break;
            }
            picked.push(id.clone());
            freed_slots += 1;
            freed += entries;
        }
        (freed_slots >= slots && freed >= excess).then_some(picked)
    }
}
