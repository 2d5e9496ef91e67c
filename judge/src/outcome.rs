//! What one request of an experiment measured: the unit every analysis of `kvab experiment` starts from.

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
    /// A shared-prefix workload's group of the request's prompt (`reuse::Shape`).
    pub group: Option<u32>,
}

impl Outcome {
    /// Answered by its own arm, without error: its timings count.
    pub fn counts(&self) -> bool {
        self.error.is_none() && self.served == Some(self.assigned)
    }

    /// Failed on its assigned arm: an error with that arm's tag, or with no arm's (no response, or an
    /// answer the gateway gave untagged). It counts against the assigned arm, ranked worst.
    pub fn failed(&self) -> bool {
        self.error.is_some() && self.served.is_none_or(|s| s == self.assigned)
    }

    /// Reached its assigned arm, or got no response at all (nothing says it went elsewhere): what the
    /// sample-ratio check counts per assigned arm.
    pub(crate) fn reached(&self) -> bool {
        match self.served {
            Some(served) => served == self.assigned,
            None => self.status.is_none(),
        }
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
