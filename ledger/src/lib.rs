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

mod caps;
pub mod store;

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
mod tests;
