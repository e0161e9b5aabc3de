//! Which traces are sampled: `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, with the
//! specification's values and one of flowmesh's own, `parentbased_ratelimiting`, the default.
//!
//! Every record is a trace, so "sample everything" (the specification's default) makes spans
//! in proportion to the record rate: harmless at 5 records/s, and at 50 000 a second it costs
//! the mesh a quarter of its throughput while the bounded queues drop most of the spans, leaving
//! traces with holes. The default instead samples every trace started here up to a number a
//! second (100), so that at a low rate every record is sampled and at a high one a steady
//! number of whole traces are; a parent's decision (the record's `traceparent`) is followed.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use opentelemetry::Context;
use opentelemetry::trace::{Link, SpanKind, TraceId, TraceState};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, ShouldSample};

/// Traces started a second under the default sampler.
pub const DEFAULT_PER_SECOND: f64 = 100.0;

/// The sampler the environment names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// `always_on`: every span.
    AlwaysOn,
    /// `always_off`: none.
    AlwaysOff,
    /// `traceidratio`: the given fraction of traces, by trace id.
    Ratio(f64),
    /// `parentbased_always_on`: as the parent decided; every trace started here.
    ParentBasedAlwaysOn,
    /// `parentbased_always_off`: as the parent decided; no trace started here.
    ParentBasedAlwaysOff,
    /// `parentbased_traceidratio`: as the parent decided; the given fraction of the traces
    /// started here.
    ParentBasedRatio(f64),
    /// `parentbased_ratelimiting` (flowmesh's own, the default): as the parent decided; the
    /// traces started here, at most the given number a second (with a burst of one second's
    /// worth).
    ParentBasedRateLimited(f64),
}

impl Default for Sampling {
    fn default() -> Self {
        Self::ParentBasedRateLimited(DEFAULT_PER_SECOND)
    }
}

impl Sampling {
    /// What `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` ask for, or an error naming the
    /// variable when one is set to something unusable (an unknown sampler, an argument out of
    /// range): the specification's SDKs fall back to a default there, which would make a typo
    /// export every span of a busy mesh.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let set = |name: &str| {
            env(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let Some(name) = set("OTEL_TRACES_SAMPLER") else {
            return Ok(Self::default());
        };
        let arg = set("OTEL_TRACES_SAMPLER_ARG");
        let number = |default: f64, max: f64| -> Result<f64, String> {
            let Some(text) = &arg else {
                return Ok(default);
            };
            text.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && (0.0..=max).contains(n))
                .ok_or_else(|| {
                    format!("OTEL_TRACES_SAMPLER_ARG={text}: expected a number from 0 to {max} for {name}")
                })
        };
        Ok(match name.as_str() {
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::Ratio(number(1.0, 1.0)?),
            "parentbased_always_on" => Self::ParentBasedAlwaysOn,
            "parentbased_always_off" => Self::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => Self::ParentBasedRatio(number(1.0, 1.0)?),
            "parentbased_ratelimiting" => {
                Self::ParentBasedRateLimited(number(DEFAULT_PER_SECOND, f64::MAX)?)
            }
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other}: expected always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio or \
                     parentbased_ratelimiting"
                ));
            }
        })
    }

    /// The SDK sampler.
    pub fn sampler(self) -> Box<dyn ShouldSample> {
        Box::new(match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::Ratio(ratio) => Sampler::TraceIdRatioBased(ratio),
            Self::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Self::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Self::ParentBasedRatio(ratio) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
            }
            Self::ParentBasedRateLimited(per_second) => {
                Sampler::ParentBased(Box::new(RateLimited::new(per_second)))
            }
        })
    }
}

/// Samples at most `per_second` traces a second: a bucket of credits that fills at that rate
/// up to one second's worth (at least one; none at a rate of 0), each sampled trace taking one.
/// Its clones share the bucket.
#[derive(Debug, Clone)]
pub struct RateLimited {
    per_second: f64,
    capacity: f64,
    bucket: Arc<Mutex<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    credits: f64,
    filled_at: Instant,
}

impl RateLimited {
    /// A full bucket: the first second's worth are sampled at once.
    pub fn new(per_second: f64) -> Self {
        let capacity = if per_second > 0.0 {
            per_second.max(1.0)
        } else {
            0.0
        };
        Self {
            per_second,
            capacity,
            bucket: Arc::new(Mutex::new(Bucket {
                credits: capacity,
                filled_at: Instant::now(),
            })),
        }
    }

    fn take(&self) -> bool {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let earned = now.duration_since(bucket.filled_at).as_secs_f64() * self.per_second;
        bucket.credits = (bucket.credits + earned).min(self.capacity);
        bucket.filled_at = now;
        if bucket.credits >= 1.0 {
            bucket.credits -= 1.0;
            true
        } else {
            false
        }
    }
}

impl ShouldSample for RateLimited {
    fn should_sample(
        &self,
        _parent_context: Option<&Context>,
        _trace_id: TraceId,
        _name: &str,
        _span_kind: &SpanKind,
        _attributes: &[opentelemetry::KeyValue],
        _links: &[Link],
    ) -> SamplingResult {
        SamplingResult {
            decision: if self.take() {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::Drop
            },
            attributes: Vec::new(),
            trace_state: TraceState::default(),
        }
    }
}
