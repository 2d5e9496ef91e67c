//! The raw shape of the `kvab serve` TOML file as serde reads it (every value with its span), and the
//! `Locator` that turns those spans into the line and column of an error.

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, EndpointPort};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) health_listen: Option<Spanned<String>>,
    pub(super) source: Option<Spanned<String>>,
    pub(super) arms: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) kubernetes: RawKubernetes,
    #[serde(default, rename = "static")]
    pub(super) static_source: RawStatic,
    #[serde(default)]
    pub(super) probe: RawProbe,
    #[serde(default)]
    pub(super) shutdown: RawShutdown,
    pub(super) filter_wasm: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) reports: RawReports,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReports {
    pub(super) state_file: Option<Spanned<String>>,
    pub(super) token_file: Option<Spanned<String>>,
    pub(super) retire_after_seconds: Option<Spanned<f64>>,
    pub(super) max_reporters: Option<Spanned<i64>>,
    pub(super) max_entries: Option<Spanned<i64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    pub(super) namespaces: Option<Vec<Spanned<String>>>,
    pub(super) pod_selector: Option<Spanned<String>>,
    pub(super) backend_label: Option<Spanned<String>>,
    pub(super) endpoint_port: Option<Spanned<EndpointPort>>,
    pub(super) unready_after_seconds: Option<Spanned<f64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStatic {
    #[serde(default)]
    pub(super) endpoints: Vec<RawStaticEndpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStaticEndpoint {
    pub(super) backend: Spanned<String>,
    pub(super) address: Spanned<String>,
    pub(super) pod: Option<String>,
    pub(super) ready: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProbe {
    pub(super) interval_seconds: Option<Spanned<f64>>,
    pub(super) timeout_seconds: Option<Spanned<f64>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) concurrency: Option<Spanned<i64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    pub(super) drain_delay_seconds: Option<Spanned<f64>>,
    pub(super) grace_seconds: Option<Spanned<f64>>,
}

/// Turns spans into `line, column` for one source text.
pub(super) struct Locator<'a> {
    pub(super) origin: &'a str,
    pub(super) text: &'a str,
}

impl Locator<'_> {
    pub(super) fn error(
        &self,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            origin: self.origin.to_string(),
            position: span.map(|s| line_column(self.text, s.start)),
            message: message.into(),
        }
    }

    pub(super) fn at<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(Some(value.span()), message)
    }

    pub(super) fn seconds(
        &self,
        value: Option<Spanned<f64>>,
        key: &str,
        default: f64,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(Duration::from_secs_f64(default));
        };
        let seconds = *value.get_ref();
        let valid = seconds.is_finite()
            && seconds <= 86_400.0
            && (seconds > 0.0 || (allow_zero && seconds == 0.0));
        if !valid {
            let range = if allow_zero { ">= 0" } else { "> 0" };
            return Err(self.at(
                &value,
                format!("`{key}` must be a number of seconds {range} and <= 86400, got {seconds}"),
            ));
        }
        Ok(Duration::from_secs_f64(seconds))
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
