//! The routing counts the filters report, turned into monotonic per-pod counters.
//!
//! Each reporter (one filter VM) sends cumulative totals per upstream endpoint with a sequence
//! number, for the entries that changed since its last acknowledged report (an entry left out
//! keeps its last total). The ledger keeps the newest totals per reporter and adds only the difference to the
//! previous report to `routed`, attributing it to the pod that owns the endpoint *now*. So a lost
//! report is made up by the next, a repeated or reordered one adds nothing, and a pod that goes
//! away keeps what it was counted: `routed` only ever grows. Pure: no I/O, no clock.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

use kvab_contract::report::{
    is_endpoint, Report, CODE_CLASSES, MAX_REPORTER_LEN, NO_ARM, UNKNOWN_ARM,
};
use serde::{Deserialize, Serialize};

/// Most entries one report may carry (a filter VM tracks at most 1024 endpoints).
pub const MAX_ENTRIES: usize = 100_000;
/// Pod label for requests no upstream answered.
pub const NO_POD: &str = "none";
/// Pod label for an endpoint that is not in the current map.
pub const UNKNOWN_POD: &str = "unknown";

/// `(requested, served, endpoint, code_class)` as a reporter sends it.
type EntryKey = (String, String, String, String);
/// An `EntryKey` shared by every reporter that has it: a thousand VMs reporting the same endpoints keep
/// one copy of each key, and cloning the ledger (for a snapshot) copies pointers, not strings.
type SharedKey = Arc<EntryKey>;

/// `(requested, served, pod, code_class)`: the labels of `kvab_routed_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoutedKey {
    pub requested: String,
    pub served: String,
    pub pod: String,
    pub code_class: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Reporter {
    sequence: u64,
    #[serde(with = "entries")]
    totals: HashMap<SharedKey, u64>,
    /// Reports refused in a row because a total went down: diagnostic only, not saved.
    #[serde(skip)]
    regressions: u32,
    /// Its first report was a baseline: an entry it reports for the first time later may hold
    /// requests a previous run counted (reports carry only changed entries), so it is a starting
    /// point too.
    #[serde(default)]
    baselined: bool,
    /// When its last report was applied (Unix ms; 0 in a ledger saved before this was kept).
    #[serde(default)]
    last_seen_ms: u64,
    /// Reports answered `stale` or `duplicate`: one filter VM sends each sequence once and one report
    /// at a time, so these are rare for one VM and about half of all reports for two VMs under one id.
    /// Diagnostic only, not saved.
    #[serde(skip)]
    out_of_order: u32,
    /// Already named as shared (counted once per id and run).
    #[serde(skip)]
    shared: bool,
}

/// Reporter ids remembered after their retirement, at most (the oldest are forgotten first).
pub const MAX_RETIRED: usize = 100_000;
/// Entries one reporter may hold (a filter VM holds far fewer: its endpoint table is bounded).
pub const MAX_REPORTER_ENTRIES: usize = 100_000;

/// Refusals in a row, for one reporter, after which a shared id is the likely cause.
pub const SHARED_ID_REGRESSIONS: u32 = 2;
/// `stale` or `duplicate` answers to one reporter after which a shared id is the likely cause.
pub const SHARED_ID_OUT_OF_ORDER: u32 = 3;

/// Caps on what the ledger holds across all reporters (`reports.max_reporters`,
/// `reports.max_entries`): memory, state file and restart replay grow with them, not with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_reporters: usize,
    pub max_entries: usize,
}

/// What a report would add to the ledger, and what would have to go for it to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Growth {
    /// 1 for a reporter the ledger does not hold.
    pub reporters: usize,
    /// Entries (keys) the reporter does not hold yet.
    pub entries: usize,
}

/// What happened to a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Newer than anything seen from this reporter; the increments it brought.
    Applied(Vec<(RoutedKey, u64)>),
    /// The first report of a reporter older than this ledger: taken as the starting point.
    Baselined,
    /// Same sequence as the newest: nothing to do.
    Duplicate,
    /// Older than the newest: nothing to do.
    Stale,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied(_) => "applied",
            Outcome::Baselined => "baselined",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    reporters: HashMap<String, Reporter>,
    #[serde(with = "routed")]
    routed: BTreeMap<RoutedKey, u64>,
    /// Persistence bookkeeping: this ledger holds every journal record of the generations before this
    /// one (see `crate::store`). 0 in a ledger saved before there was a journal.
    #[serde(default)]
    pub journal_generation: u64,
    /// Every entry key in use, each held once (see `SharedKey`); rebuilt by `share_keys` after loading.
    #[serde(skip)]
    keys: HashSet<SharedKey>,
    /// Reporters retired for idleness (id → when, Unix ms): their counts stay in `routed`, their totals
    /// are dropped, and a report from one of them again is a starting point, never counted from zero.
    #[serde(default)]
    retired: HashMap<String, u64>,
    /// Entries of all reporters together (kept as they change; recounted by `share_keys`).
    #[serde(skip)]
    entries: usize,
    /// Reporter ids found shared by two VMs since last taken (`take_shared`).
    #[serde(skip)]
    newly_shared: Vec<String>,
}

/// One line of the journal: a report's change, or reporters retired.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Retired { retired: Vec<String>, at_ms: u64 },
    Report(Record),
}

/// What one applied report changed, as the journal keeps it: replaying it gives the ledger the same
/// state, whatever map the pods were in when it was first applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub reporter: String,
    pub sequence: u64,
    pub baselined: bool,
    /// When it was applied (Unix ms).
    #[serde(default)]
    pub seen_ms: u64,
    /// The report's totals (the entries it changed).
    #[serde(with = "entries")]
    totals: HashMap<EntryKey, u64>,
    increments: Vec<(RoutedKey, u64)>,
}

/// How to take one applied report back out, when saving it failed: what it changed, as it was.
#[derive(Debug)]
pub struct Undo {
    reporter: String,
    /// `None`: the reporter was new.
    previous: Option<PreviousReporter>,
    /// When it had been retired, if it was.
    retired_at_ms: Option<u64>,
    routed: Vec<(RoutedKey, Option<u64>)>,
}

#[derive(Debug)]
struct PreviousReporter {
    sequence: u64,
    baselined: bool,
    regressions: u32,
    last_seen_ms: u64,
    entries: Vec<(SharedKey, Option<u64>)>,
}

impl Ledger {
    /// Applies one report. `arms` are the configured arm names; `pod_of` names the pod that
    /// currently owns an endpoint address (`None`: not in the map); `baseline_unknown` makes the
    /// first report of a reporter a starting point instead of counting its totals.
    /// An invalid report changes nothing and says why.
    #[allow(dead_code)] // The unit tests and the fuzz model use the plain form.
    pub fn apply(
        &mut self,
        report: &Report,
        arms: &[String],
        pod_of: &dyn Fn(&str) -> Option<String>,
        baseline_unknown: bool,
    ) -> Result<Outcome, String> {
        self.apply_logged(report, arms, pod_of, baseline_unknown, 0)
            .map(|(outcome, _)| outcome)
    }

    /// `apply`, also returning, when the ledger changed, the journal record of the change and how to
    /// undo it. `now_ms` is kept as the reporter's last report time (for `idle_reporters`).
    pub fn apply_logged(
        &mut self,
        report: &Report,
        arms: &[String],
        pod_of: &dyn Fn(&str) -> Option<String>,
        baseline_unknown: bool,
        now_ms: u64,
    ) -> Result<(Outcome, Option<(Record, Undo)>), String> {
        let totals = validate(report, arms)?;
        let previous = self.reporters.get(&report.reporter);
        // A retired reporter's totals are gone: counting its report from zero would count again what
        // it counted before, so it starts over from this report.
        let returning = previous.is_none() && self.retired.contains_key(&report.reporter);
        let baselined = match previous {
            Some(p) if report.sequence == p.sequence => {
                self.out_of_order(&report.reporter);
                return Ok((Outcome::Duplicate, None));
            }
            Some(p) if report.sequence < p.sequence => {
                self.out_of_order(&report.reporter);
                return Ok((Outcome::Stale, None));
            }
            Some(p) => p.baselined,
            None => baseline_unknown || returning,
        };
        let previous = self.reporters.get(&report.reporter);
        if let Some(p) = previous {
            let grown = totals.keys().filter(|k| !p.totals.contains_key(*k)).count();
            if p.totals.len() + grown > MAX_REPORTER_ENTRIES {
                return Err(format!(
                    "this reporter would hold more than {MAX_REPORTER_ENTRIES} entries; a filter VM bounds its endpoints far below that"
                ));
            }
        }
        // The first report of a reporter this ledger does not know, taken as a starting point.
        let starting_point = previous.is_none() && (baseline_unknown || returning);
        let mut increments: BTreeMap<RoutedKey, u64> = BTreeMap::new();
        if !starting_point {
            let empty = HashMap::new();
            let before = previous.map_or(&empty, |p| &p.totals);
            for (key, &count) in &totals {
                let was = match before.get(key) {
                    Some(&was) => was,
                    None if baselined => count,
                    None => 0,
                };
                if count < was {
                    return Err(self.regression(&report.reporter, key, was, count));
                }
                if count > was {
                    let (requested, served, endpoint, code_class) = key.clone();
                    let pod = match endpoint.as_str() {
                        "" => NO_POD.to_owned(),
                        address => pod_of(address).unwrap_or_else(|| UNKNOWN_POD.to_owned()),
                    };
                    let routed = RoutedKey {
                        requested,
                        served,
                        pod,
                        code_class,
                    };
                    // Saturating: a counter stuck at u64::MAX is wrong but never goes down, which
                    // Prometheus would read as a reset.
                    let increment = increments.entry(routed).or_default();
                    *increment = increment.saturating_add(count - was);
                }
            }
        }
        let record = Record {
            reporter: report.reporter.clone(),
            sequence: report.sequence,
            baselined,
            seen_ms: now_ms,
            totals,
            increments: increments.into_iter().collect(),
        };
        let undo = self.replay(&record);
        let outcome = if starting_point {
            Outcome::Baselined
        } else {
            Outcome::Applied(record.increments.clone())
        };
        Ok((outcome, Some((record, undo))))
    }

    /// Applies a journal record (also the second half of `apply_logged`); returns its undo. Works on the
    /// entries the record names only: its cost does not depend on the reporter's size.
    pub fn replay(&mut self, record: &Record) -> Undo {
        let routed = record
            .increments
            .iter()
            .map(|(key, _)| (key.clone(), self.routed.get(key).copied()))
            .collect();
        for (key, n) in &record.increments {
            let counter = self.routed.entry(key.clone()).or_default();
            *counter = counter.saturating_add(*n);
        }
        let totals: Vec<(SharedKey, u64)> = record
            .totals
            .iter()
            .map(|(key, count)| (self.share(key), *count))
            .collect();
        let retired_at_ms = self.retired.remove(&record.reporter);
        let existed = self.reporters.contains_key(&record.reporter);
        let reporter = self.reporters.entry(record.reporter.clone()).or_default();
        let previous = existed.then(|| PreviousReporter {
            sequence: reporter.sequence,
            baselined: reporter.baselined,
            regressions: reporter.regressions,
            last_seen_ms: reporter.last_seen_ms,
            entries: totals
                .iter()
                .map(|(key, _)| (key.clone(), reporter.totals.get(key).copied()))
                .collect(),
        });
        let grown = totals
            .iter()
            .filter(|(key, _)| !reporter.totals.contains_key(key))
            .count();
        // Entries a reporter stops sending keep their last total (cumulative counts never vanish).
        reporter.totals.extend(totals);
        self.entries += grown;
        reporter.sequence = record.sequence;
        reporter.baselined = record.baselined;
        reporter.regressions = 0;
        reporter.last_seen_ms = record.seen_ms;
        Undo {
            reporter: record.reporter.clone(),
            previous,
            retired_at_ms,
            routed,
        }
    }

    /// Takes an applied report back out. Undos must be undone newest first.
    pub fn undo(&mut self, undo: Undo) {
        for (key, before) in undo.routed {
            match before {
                Some(n) => self.routed.insert(key, n),
                None => self.routed.remove(&key),
            };
        }
        if let Some(at) = undo.retired_at_ms {
            self.retired.insert(undo.reporter.clone(), at);
        }
        let Some(previous) = undo.previous else {
            if let Some(gone) = self.reporters.remove(&undo.reporter) {
                self.entries = self.entries.saturating_sub(gone.totals.len());
            }
            return;
        };
        if let Some(reporter) = self.reporters.get_mut(&undo.reporter) {
            reporter.sequence = previous.sequence;
            reporter.baselined = previous.baselined;
            reporter.regressions = previous.regressions;
            reporter.last_seen_ms = previous.last_seen_ms;
            for (key, before) in previous.entries {
                match before {
                    Some(n) => {
                        reporter.totals.insert(key, n);
                    }
                    None => {
                        if reporter.totals.remove(&key).is_some() {
                            self.entries = self.entries.saturating_sub(1);
                        }
                    }
                };
            }
        }
    }

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

    /// Applies one journal line.
    pub fn replay_line(&mut self, line: &Line) {
        match line {
            Line::Report(record) => {
                self.replay(record);
            }
            Line::Retired { retired, at_ms } => self.retire(retired, *at_ms),
        }
    }

    pub fn retired(&self) -> usize {
        self.retired.len()
    }

    /// The one shared copy of `key`.
    fn share(&mut self, key: &EntryKey) -> SharedKey {
        if let Some(shared) = self.keys.get(key) {
            return shared.clone();
        }
        let shared = Arc::new(key.clone());
        self.keys.insert(shared.clone());
        shared
    }

    /// After loading: one copy of each key for all reporters (deserializing made one per entry).
    pub fn share_keys(&mut self) {
        let mut reporters = std::mem::take(&mut self.reporters);
        for reporter in reporters.values_mut() {
            reporter.totals = std::mem::take(&mut reporter.totals)
                .into_iter()
                .map(|(key, count)| (self.share(&key), count))
                .collect();
        }
        self.reporters = reporters;
        self.entries = self.reporters.values().map(|r| r.totals.len()).sum();
    }

    /// Entries (per-reporter totals) held, all reporters together.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// What `report` would add if applied: nothing for a repeat or an older report.
    fn growth(&self, report: &Report) -> Growth {
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

    /// Reporter ids found shared by two filter VMs since the last call.
    pub fn take_shared(&mut self) -> Vec<String> {
        std::mem::take(&mut self.newly_shared)
    }

    /// A `stale` or `duplicate` report from `reporter_id`: after a few, names the id as shared.
    fn out_of_order(&mut self, reporter_id: &str) {
        if let Some(reporter) = self.reporters.get_mut(reporter_id) {
            reporter.out_of_order = reporter.out_of_order.saturating_add(1);
            if reporter.out_of_order >= SHARED_ID_OUT_OF_ORDER && !reporter.shared {
                reporter.shared = true;
                self.newly_shared.push(reporter_id.to_owned());
            }
        }
    }

    fn regression(&mut self, reporter_id: &str, key: &EntryKey, was: u64, count: u64) -> String {
        let mut message = format!(
            "count for requested={} served={} endpoint={:?} code_class={} went down from {was} to {count}; totals are cumulative",
            key.0, key.1, key.2, key.3
        );
        if let Some(reporter) = self.reporters.get_mut(reporter_id) {
            reporter.regressions = reporter.regressions.saturating_add(1);
            if reporter.regressions >= SHARED_ID_REGRESSIONS {
                if !reporter.shared {
                    reporter.shared = true;
                    self.newly_shared.push(reporter_id.to_owned());
                }
                message.push_str(&format!(
                    " ({} reports in a row: two filter VMs are sending under this one reporter id, and about half of their counts are refused)",
                    reporter.regressions
                ));
            }
        }
        message
    }

    /// Every counter, for exporting (and for restoring them after a restart).
    pub fn routed(&self) -> impl Iterator<Item = (&RoutedKey, u64)> {
        self.routed.iter().map(|(k, v)| (k, *v))
    }

    pub fn reporters(&self) -> usize {
        self.reporters.len()
    }
}

/// Checks every field against the contract; returns the totals keyed for lookup.
fn validate(report: &Report, arms: &[String]) -> Result<HashMap<EntryKey, u64>, String> {
    if report.reporter.is_empty()
        || report.reporter.len() > MAX_REPORTER_LEN
        || !report.reporter.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(format!(
            "reporter must be 1 to {MAX_REPORTER_LEN} printable ASCII characters"
        ));
    }
    if report.sequence == 0 {
        return Err("sequence starts at 1".into());
    }
    if report.totals.len() > MAX_ENTRIES {
        return Err(format!(
            "at most {MAX_ENTRIES} totals per report, got {}",
            report.totals.len()
        ));
    }
    let is_arm = |v: &str| arms.iter().any(|a| a == v);
    let mut totals = HashMap::with_capacity(report.totals.len());
    for (i, t) in report.totals.iter().enumerate() {
        if !(is_arm(&t.requested) || t.requested == NO_ARM) {
            return Err(format!(
                "totals[{i}].requested: {:?} is not an arm or \"none\"",
                t.requested
            ));
        }
        if !(is_arm(&t.served) || t.served == NO_ARM || t.served == UNKNOWN_ARM) {
            return Err(format!(
                "totals[{i}].served: {:?} is not an arm, \"unknown\" or \"none\"",
                t.served
            ));
        }
        if !CODE_CLASSES.contains(&t.code_class.as_str()) {
            return Err(format!(
                "totals[{i}].code_class: {:?} is not one of {CODE_CLASSES:?}",
                t.code_class
            ));
        }
        if !is_endpoint(t.endpoint.as_bytes()) {
            return Err(format!(
                "totals[{i}].endpoint: {:?} is not ip:port, \"other\" or empty",
                t.endpoint
            ));
        }
        let key = (
            t.requested.clone(),
            t.served.clone(),
            t.endpoint.clone(),
            t.code_class.clone(),
        );
        if totals.insert(key, t.count).is_some() {
            return Err(format!("totals[{i}] repeats an earlier entry"));
        }
    }
    Ok(totals)
}

/// Maps with tuple or struct keys are stored as lists of rows in JSON.
mod entries {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<K: Borrow<EntryKey>, S: Serializer>(
        map: &HashMap<K, u64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut rows: Vec<(&String, &String, &String, &String, u64)> = map
            .iter()
            .map(|(key, n)| {
                let (a, b, c, d) = key.borrow();
                (a, b, c, d, *n)
            })
            .collect();
        rows.sort();
        rows.serialize(s)
    }

    pub fn deserialize<'de, K: From<EntryKey> + Hash + Eq, D: Deserializer<'de>>(
        d: D,
    ) -> Result<HashMap<K, u64>, D::Error> {
        let rows: Vec<(String, String, String, String, u64)> = Vec::deserialize(d)?;
        Ok(rows
            .into_iter()
            .map(|(a, b, c, e, n)| (K::from((a, b, c, e)), n))
            .collect())
    }
}

mod routed {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<RoutedKey, u64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        map.iter().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<RoutedKey, u64>, D::Error> {
        Ok(Vec::<(RoutedKey, u64)>::deserialize(d)?
            .into_iter()
            .collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use kvab_contract::report::RoutedCount;

    use super::*;

    fn arms() -> Vec<String> {
        vec!["nvlink".into(), "fs".into()]
    }

    fn report(reporter: &str, sequence: u64, rows: &[(&str, &str, &str, &str, u64)]) -> Report {
        Report {
            reporter: reporter.into(),
            sequence,
            started_at_ms: 0,
            totals: rows
                .iter()
                .map(
                    |&(requested, served, endpoint, code_class, count)| RoutedCount {
                        requested: requested.into(),
                        served: served.into(),
                        endpoint: endpoint.into(),
                        code_class: code_class.into(),
                        count,
                    },
                )
                .collect(),
        }
    }

    fn pods(address: &str) -> Option<String> {
        match address {
            "10.0.0.5:8080" => Some("llm-d-vllm/p2p".into()),
            "10.0.0.7:8080" => Some("llm-d-vllm/fs".into()),
            _ => None,
        }
    }

    fn key(requested: &str, served: &str, pod: &str, class: &str) -> RoutedKey {
        RoutedKey {
            requested: requested.into(),
            served: served.into(),
            pod: pod.into(),
            code_class: class.into(),
        }
    }

    fn total(ledger: &Ledger) -> u64 {
        ledger.routed().map(|(_, n)| n).sum()
    }

    #[test]
    fn counters_saturate_instead_of_wrapping() {
        let mut ledger = Ledger::default();
        let max = u64::MAX;
        let r1 = report(
            "a",
            1,
            &[
                ("nvlink", "nvlink", "10.0.0.9:1", "2xx", max),
                ("nvlink", "nvlink", "10.0.0.9:2", "2xx", max),
            ],
        );
        ledger.apply(&r1, &arms(), &pods, false).unwrap();
        let r2 = report("b", 1, &[("nvlink", "nvlink", "10.0.0.9:3", "2xx", 1)]);
        ledger.apply(&r2, &arms(), &pods, false).unwrap();
        assert_eq!(
            ledger.routed().collect::<Vec<_>>(),
            [(&key("nvlink", "nvlink", "unknown", "2xx"), max)]
        );
    }

    #[test]
    fn only_increments_are_added_and_repeats_add_nothing() {
        let mut ledger = Ledger::default();
        let r1 = report("a", 1, &[("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 3)]);
        let out = ledger.apply(&r1, &arms(), &pods, false).unwrap();
        assert_eq!(
            out,
            Outcome::Applied(vec![(key("nvlink", "nvlink", "llm-d-vllm/p2p", "2xx"), 3)])
        );
        assert_eq!(
            ledger.apply(&r1, &arms(), &pods, false).unwrap(),
            Outcome::Duplicate
        );
        let r3 = report(
            "a",
            3,
            &[
                ("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 5),
                ("none", "fs", "10.0.0.7:8080", "2xx", 1),
            ],
        );
        ledger.apply(&r3, &arms(), &pods, false).unwrap();
        // Sequence 2 was lost and arrives late: it changes nothing.
        let r2 = report("a", 2, &[("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 4)]);
        assert_eq!(
            ledger.apply(&r2, &arms(), &pods, false).unwrap(),
            Outcome::Stale
        );
        assert_eq!(total(&ledger), 6);
        // A second reporter adds its own totals.
        ledger
            .apply(
                &report("b", 1, &[("fs", "fs", "10.0.0.7:8080", "5xx", 2)]),
                &arms(),
                &pods,
                false,
            )
            .unwrap();
        assert_eq!(total(&ledger), 8);
        assert_eq!(ledger.reporters(), 2);
    }

    #[test]
    fn increments_go_to_the_pod_that_owns_the_endpoint_now() {
        let mut ledger = Ledger::default();
        ledger
            .apply(
                &report("a", 1, &[("fs", "fs", "10.0.0.7:8080", "2xx", 2)]),
                &arms(),
                &pods,
                false,
            )
            .unwrap();
        // The address moves to another pod: the old pod keeps its 2, the new one gets the rest.
        let moved = |a: &str| (a == "10.0.0.7:8080").then(|| "llm-d-vllm/fs-2".to_string());
        ledger
            .apply(
                &report("a", 2, &[("fs", "fs", "10.0.0.7:8080", "2xx", 5)]),
                &arms(),
                &moved,
                false,
            )
            .unwrap();
        let rows: Vec<(RoutedKey, u64)> = ledger.routed().map(|(k, n)| (k.clone(), n)).collect();
        assert_eq!(
            rows,
            [
                (key("fs", "fs", "llm-d-vllm/fs", "2xx"), 2),
                (key("fs", "fs", "llm-d-vllm/fs-2", "2xx"), 3)
            ]
        );
        // No upstream and unknown addresses get their own pod labels.
        ledger
            .apply(
                &report(
                    "a",
                    3,
                    &[
                        ("none", "none", "", "4xx", 1),
                        ("fs", "unknown", "10.9.9.9:1", "2xx", 1),
                    ],
                ),
                &arms(),
                &pods,
                false,
            )
            .unwrap();
        assert!(ledger.routed().any(|(k, n)| k.pod == NO_POD && n == 1));
        assert!(ledger.routed().any(|(k, n)| k.pod == UNKNOWN_POD && n == 1));
    }

    #[test]
    fn an_entry_left_out_keeps_its_total_and_counts_on_when_it_comes_back() {
        let mut ledger = Ledger::default();
        let a = ("fs", "fs", "10.0.0.7:8080", "2xx");
        let b = ("nvlink", "nvlink", "10.0.0.5:8080", "2xx");
        let row = |(r, s, e, c): (&'static str, &'static str, &'static str, &'static str), n| {
            (r, s, e, c, n)
        };
        ledger
            .apply(
                &report("vm", 1, &[row(a, 5), row(b, 3)]),
                &arms(),
                &pods,
                false,
            )
            .unwrap();
        // Only `a` changed: `b` is left out and keeps 3.
        ledger
            .apply(&report("vm", 2, &[row(a, 9)]), &arms(), &pods, false)
            .unwrap();
        assert_eq!(total(&ledger), 12);
        ledger
            .apply(&report("vm", 3, &[row(b, 4)]), &arms(), &pods, false)
            .unwrap();
        assert_eq!(total(&ledger), 13);
    }

    #[test]
    fn a_baselined_reporter_s_new_entries_are_starting_points_too() {
        // Without saved state the first report of an older VM is a baseline; an entry that VM
        // reports for the first time later may hold requests the previous run counted.
        let mut ledger = Ledger::default();
        let a = ("fs", "fs", "10.0.0.7:8080", "2xx", 50);
        ledger
            .apply(&report("old", 8, &[a]), &arms(), &pods, true)
            .unwrap();
        ledger
            .apply(
                &report(
                    "old",
                    9,
                    &[("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 40)],
                ),
                &arms(),
                &pods,
                true,
            )
            .unwrap();
        assert_eq!(total(&ledger), 0);
        ledger
            .apply(
                &report(
                    "old",
                    10,
                    &[
                        ("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 42),
                        ("fs", "fs", "10.0.0.7:8080", "2xx", 51),
                    ],
                ),
                &arms(),
                &pods,
                true,
            )
            .unwrap();
        assert_eq!(total(&ledger), 3);
        // A reporter first seen with nothing to baseline counts its new entries in full.
        ledger
            .apply(
                &report("new", 1, &[("fs", "fs", "10.0.0.7:8080", "2xx", 7)]),
                &arms(),
                &pods,
                false,
            )
            .unwrap();
        ledger
            .apply(
                &report("new", 2, &[("fs", "fs", "", "5xx", 2)]),
                &arms(),
                &pods,
                false,
            )
            .unwrap();
        assert_eq!(total(&ledger), 12);
    }

    #[test]
    fn a_first_report_can_be_a_baseline() {
        let mut ledger = Ledger::default();
        let r = report(
            "old",
            7,
            &[("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 100)],
        );
        assert_eq!(
            ledger.apply(&r, &arms(), &pods, true).unwrap(),
            Outcome::Baselined
        );
        assert_eq!(total(&ledger), 0);
        let next = report(
            "old",
            8,
            &[("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 104)],
        );
        ledger.apply(&next, &arms(), &pods, true).unwrap();
        assert_eq!(total(&ledger), 4);
    }

    #[test]
    fn two_vms_under_one_id_are_named_after_repeated_regressions() {
        // Two VMs' cumulative totals interleaved under one id: each one's report goes down
        // against the other's, so about half are refused, and the repeats say why.
        let mut ledger = Ledger::default();
        let row = |count| [("fs", "fs", "10.0.0.7:8080", "2xx", count)];
        ledger
            .apply(&report("dup", 1, &row(60)), &arms(), &pods, false)
            .unwrap();
        let first = ledger.apply(&report("dup", 2, &row(50)), &arms(), &pods, false);
        assert!(
            first
                .as_ref()
                .is_err_and(|e| e.contains("went down") && !e.contains("two filter VMs")),
            "{first:?}"
        );
        let second = ledger.apply(&report("dup", 3, &row(55)), &arms(), &pods, false);
        assert!(
            second
                .as_ref()
                .is_err_and(|e| e.contains("2 reports in a row: two filter VMs")),
            "{second:?}"
        );
        // An accepted report clears the streak.
        ledger
            .apply(&report("dup", 4, &row(70)), &arms(), &pods, false)
            .unwrap();
        let again = ledger.apply(&report("dup", 5, &row(65)), &arms(), &pods, false);
        assert!(
            again.as_ref().is_err_and(|e| !e.contains("two filter VMs")),
            "{again:?}"
        );
        assert_eq!(total(&ledger), 70);
    }

    #[test]
    fn a_retired_reporter_keeps_its_counts_and_is_never_counted_from_zero_again() {
        let mut ledger = Ledger::default();
        let row = |n| [("fs", "fs", "10.0.0.7:8080", "2xx", n)];
        ledger
            .apply_logged(&report("a", 1, &row(10)), &arms(), &pods, false, 1_000)
            .unwrap();
        ledger
            .apply_logged(&report("b", 1, &row(3)), &arms(), &pods, false, 5_000)
            .unwrap();
        assert_eq!(ledger.idle_reporters(2_000, 0), vec!["a".to_string()]);
        ledger.retire(&["a".to_string()], 6_000);
        assert_eq!((ledger.reporters(), ledger.retired()), (1, 1));
        let total = |l: &Ledger| l.routed().map(|(_, n)| n).sum::<u64>();
        assert_eq!(total(&ledger), 13, "its counts stay");
        // Back with cumulative totals: a starting point, not 15 more.
        let (outcome, _) = ledger
            .apply_logged(&report("a", 2, &row(15)), &arms(), &pods, false, 7_000)
            .unwrap();
        assert_eq!(outcome, Outcome::Baselined);
        assert_eq!((total(&ledger), ledger.retired()), (13, 0));
        ledger
            .apply_logged(&report("a", 3, &row(20)), &arms(), &pods, false, 8_000)
            .unwrap();
        assert_eq!(total(&ledger), 18);
        // A reporter saved before report times were kept counts as seen when the ledger was loaded.
        ledger.reporters.get_mut("b").unwrap().last_seen_ms = 0;
        assert_eq!(ledger.idle_reporters(9_000, 10_000), vec!["a".to_string()]);
    }

    #[test]
    fn retired_ids_are_bounded_and_unused_keys_dropped() {
        let mut ledger = Ledger::default();
        for i in 0..3 {
            let endpoint = format!("10.0.0.{i}:8080");
            let rows = [("fs", "fs", endpoint.as_str(), "2xx", 1)];
            ledger
                .apply_logged(
                    &report(&format!("vm{i}"), 1, &rows),
                    &arms(),
                    &pods,
                    false,
                    1,
                )
                .unwrap();
        }
        assert_eq!(ledger.keys.len(), 3);
        ledger.retire(&["vm0".to_string(), "vm1".to_string()], 2);
        assert_eq!(ledger.keys.len(), 1, "only vm2's key is still held");
        let ids: Vec<String> = (0..MAX_RETIRED + 10).map(|i| format!("x{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            ledger.retired.insert(id.clone(), i as u64 + 10);
        }
        ledger.retire(&[], 99);
        assert_eq!(ledger.retired(), MAX_RETIRED);
        assert!(
            !ledger.retired.contains_key("vm0"),
            "the oldest are forgotten first"
        );
        assert!(ledger.retired.contains_key(&ids[ids.len() - 1]));
    }

    #[test]
    fn an_undone_report_leaves_the_ledger_as_it_was_and_a_replayed_one_as_applied() {
        let mut ledger = Ledger::default();
        let first = report("a", 1, &[("fs", "fs", "10.0.0.7:8080", "2xx", 5)]);
        ledger.apply(&first, &arms(), &pods, false).unwrap();
        let before = serde_json::to_string(&ledger).unwrap();
        let next = report(
            "a",
            2,
            &[
                ("fs", "fs", "10.0.0.7:8080", "2xx", 9),
                ("fs", "fs", "10.0.0.7:8080", "5xx", 1),
            ],
        );
        let (_, change) = ledger
            .apply_logged(&next, &arms(), &pods, false, 9)
            .unwrap();
        let (record, undo) = change.unwrap();
        let applied = serde_json::to_string(&ledger).unwrap();
        ledger.undo(undo);
        assert_eq!(serde_json::to_string(&ledger).unwrap(), before);
        let (_, change) = ledger
            .apply_logged(
                &report("b", 1, &[("fs", "fs", "", "2xx", 2)]),
                &arms(),
                &pods,
                false,
                9,
            )
            .unwrap();
        ledger.undo(change.unwrap().1);
        assert_eq!(
            serde_json::to_string(&ledger).unwrap(),
            before,
            "a new reporter is removed"
        );
        // The journal's record, replayed on the old state, gives what applying gave.
        let record: Record =
            serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
        ledger.replay(&record);
        assert_eq!(serde_json::to_string(&ledger).unwrap(), applied);
    }

    #[test]
    fn entries_are_counted_through_apply_undo_retire_and_load_and_room_is_made_from_the_idle() {
        let mut ledger = Ledger::default();
        let recount = |l: &Ledger| l.reporters.values().map(|r| r.totals.len()).sum::<usize>();
        let rows = |n: usize| -> Vec<(String, u64)> {
            (0..n).map(|i| (format!("10.0.1.{i}:8080"), 1)).collect()
        };
        let wide = |id: &str, sequence, n| {
            let rows = rows(n);
            let rows: Vec<_> = rows
                .iter()
                .map(|(e, c)| ("fs", "fs", e.as_str(), "2xx", *c))
                .collect();
            report(id, sequence, &rows)
        };
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            ledger
                .apply_logged(&wide(id, 1, 4), &arms(), &pods, false, 10 * i as u64)
                .unwrap();
        }
        assert_eq!((ledger.entries(), recount(&ledger)), (12, 12));
        let (_, change) = ledger
            .apply_logged(&wide("a", 2, 6), &arms(), &pods, false, 50)
            .unwrap();
        assert_eq!(ledger.entries(), 14);
        ledger.undo(change.unwrap().1);
        assert_eq!((ledger.entries(), recount(&ledger)), (12, 12));
        let limits = Limits {
            max_reporters: 3,
            max_entries: 14,
        };
        let growth = ledger.growth(&wide("d", 1, 3));
        assert_eq!(
            growth,
            Growth {
                reporters: 1,
                entries: 3
            }
        );
        assert!(!ledger.fits(growth, &limits));
        assert_eq!(
            ledger.growth(&wide("a", 1, 9)),
            Growth::default(),
            "a repeat adds nothing"
        );
        // Idle since before 15 ms: a (0) and b (10); a is the longest idle, and one is enough.
        assert_eq!(
            ledger.make_room(growth, &limits, 15, 0, "d"),
            Some(vec!["a".to_string()])
        );
        // Before 5 ms only a: not enough for 9 more entries.
        let big = ledger.growth(&wide("d", 1, 9));
        assert_eq!(ledger.make_room(big, &limits, 5, 0, "d"), None);
        ledger.retire(&["a".to_string()], 60);
        assert_eq!((ledger.entries(), recount(&ledger)), (8, 8));
        let json = serde_json::to_vec(&ledger).unwrap();
        let mut back: Ledger = serde_json::from_slice(&json).unwrap();
        back.share_keys();
        assert_eq!(back.entries(), 8);
    }

    #[test]
    fn stale_and_duplicate_reports_name_a_shared_id_once() {
        let mut ledger = Ledger::default();
        let row = |n| [("fs", "fs", "10.0.0.7:8080", "2xx", n)];
        ledger
            .apply(&report("dup", 10, &row(5)), &arms(), &pods, false)
            .unwrap();
        for sequence in [3, 10, 4, 5, 6] {
            ledger
                .apply(&report("dup", sequence, &row(9)), &arms(), &pods, false)
                .unwrap();
        }
        assert_eq!(ledger.take_shared(), ["dup".to_string()]);
        assert!(ledger.take_shared().is_empty());
        // Regressions name it too, once.
        let mut ledger = Ledger::default();
        ledger
            .apply(&report("x", 1, &row(9)), &arms(), &pods, false)
            .unwrap();
        for sequence in 2..6 {
            let _ = ledger.apply(&report("x", sequence, &row(1)), &arms(), &pods, false);
        }
        assert_eq!(ledger.take_shared(), ["x".to_string()]);
    }

    #[test]
    fn invalid_reports_change_nothing() {
        let mut ledger = Ledger::default();
        ledger
            .apply(
                &report("a", 1, &[("fs", "fs", "10.0.0.7:8080", "2xx", 5)]),
                &arms(),
                &pods,
                false,
            )
            .unwrap();
        for (bad, why) in [
            (
                report("a", 2, &[("fs", "fs", "10.0.0.7:8080", "2xx", 4)]),
                "went down",
            ),
            (report("", 2, &[]), "reporter"),
            (report("a b", 2, &[]), "reporter"),
            (report("a", 0, &[]), "sequence"),
            (report("a", 2, &[("gpu", "fs", "", "2xx", 1)]), "requested"),
            (report("a", 2, &[("fs", "gpu", "", "2xx", 1)]), "served"),
            // Configured arms are ArmNames: a name no part may change is no configured arm.
            (
                report("a", 2, &[("NVLink", "nvlink", "", "2xx", 1)]),
                "requested: \"NVLink\" is not an arm",
            ),
            (
                report("a", 2, &[("fs", "FS", "", "2xx", 1)]),
                "served: \"FS\" is not an arm",
            ),
            (report("a", 2, &[("fs", "fs", "", "2XX", 1)]), "code_class"),
            (
                report("a", 2, &[("fs", "fs", "<script>", "2xx", 1)]),
                "endpoint",
            ),
            (
                report(
                    "a",
                    2,
                    &[("fs", "fs", "", "2xx", 1), ("fs", "fs", "", "2xx", 2)],
                ),
                "repeats",
            ),
        ] {
            let e = ledger.apply(&bad, &arms(), &pods, false).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        assert_eq!(total(&ledger), 5);
    }

    #[test]
    fn the_ledger_survives_a_round_trip_through_json() {
        let mut ledger = Ledger::default();
        ledger
            .apply(
                &report("a", 4, &[("fs", "fs", "10.0.0.7:8080", "2xx", 5)]),
                &arms(),
                &pods,
                false,
            )
            .unwrap();
        let json = serde_json::to_vec(&ledger).unwrap();
        let mut back: Ledger = serde_json::from_slice(&json).unwrap();
        assert_eq!(total(&back), 5);
        assert_eq!(
            back.apply(
                &report("a", 4, &[("fs", "fs", "10.0.0.7:8080", "2xx", 5)]),
                &arms(),
                &pods,
                false
            )
            .unwrap(),
            Outcome::Duplicate
        );
        back.apply(
            &report("a", 5, &[("fs", "fs", "10.0.0.7:8080", "2xx", 6)]),
            &arms(),
            &pods,
            false,
        )
        .unwrap();
        assert_eq!(total(&back), 6);
    }
}
