//! Logging: JSON lines on stdout by default (every line carries `service`), a human format on
//! request, filtered by `RUST_LOG`; and the services' spans, where traces are exported.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::traces::Traces;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (the default).
    Json,
    /// Human-readable text.
    Text,
}

/// Installs the global subscriber: log lines in `format`, and, with `traces`, the services' own
/// spans exported through it (see [`crate::traces`]). Safe to call more than once (later calls
/// do nothing), so in-process tests can start several services.
pub fn init(service: &'static str, format: LogFormat, traces: Option<&Traces>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A log line that cannot be written (stdout closed) must never take a task down with it.
    let lines = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .log_internal_errors(false)
            .event_format(JsonLines { service })
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .log_internal_errors(false)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
    };
    let spans = traces.map(|traces| {
        tracing_opentelemetry::layer()
            .with_tracer(traces.tracer(service))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                crate::traces::is_own_target(meta.target())
            }))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .with(spans)
        .try_init();
}

/// A flat JSON line: `timestamp`, `level`, `service`, `target`, `message`, then the event's
/// fields and the names of the spans it happened in.
struct JsonLines {
    service: &'static str,
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(crate::record::format_timestamp(chrono::Utc::now())),
        );
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("service".into(), Value::String(self.service.into()));
        line.insert("target".into(), Value::String(meta.target().into()));
        let mut visitor = Fields(&mut line);
        event.record(&mut visitor);
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| Value::String(span.name().into()))
                .collect();
            if !spans.is_empty() {
                line.insert("spans".into(), Value::Array(spans));
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}

/// Query parameters whose values are secrets (compared case-insensitively, as substrings).
const SECRET_PARAMS: &[&str] = &[
    "password", "passwd", "pwd", "secret", "token", "key", "auth",
];

/// A URL fit for logs: its password and the values of secret-looking query parameters become
/// `***` (`amqp://user:***@host/`), whatever characters they hold. A URL that does not parse is
/// not printed at all. A list of URLs separated by commas (a cluster's nodes) is redacted URL
/// by URL.
pub fn redact_url(text: &str) -> String {
    if text.contains(',') && text.matches("://").count() > 1 {
        // Several URLs: parsed whole, the second would hide in the first one's path.
        return text
            .split(',')
            .map(|one| redact_url(one.trim()))
            .collect::<Vec<_>>()
            .join(",");
    }
    let Ok(mut url) = url::Url::parse(text) else {
        return "<unparsable URL>".into();
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(key, value)| {
            let lower = key.to_ascii_lowercase();
            let secret = SECRET_PARAMS.iter().any(|p| lower.contains(p));
            (
                key.into_owned(),
                if secret {
                    "***".into()
                } else {
                    value.into_owned()
                },
            )
        })
        .collect();
    if !pairs.is_empty() {
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string().replace("%2A%2A%2A", "***")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("amqp://h:5672"), "amqp://h:5672");
        assert_eq!(redact_url("mongodb://a:p@ss@h"), "mongodb://a:***@h");
        let slashed = redact_url("postgres://u:Xy/Zq:w%40rd@h:5432/db");
        assert!(
            !slashed.contains("Xy") && !slashed.contains("w%40rd"),
            "{slashed}"
        );
        let encoded = redact_url("postgres://u:Xy%2FZq@h:5432/db");
        assert_eq!(encoded, "postgres://u:***@h:5432/db");
        let query =
            redact_url("mongodb://h/?authSource=admin&tlsCertificateKeyFilePassword=x1&token=y2");
        assert!(!query.contains("x1") && !query.contains("y2"), "{query}");
        assert_eq!(redact_url("not a url"), "<unparsable URL>");
        assert_eq!(
            redact_url("amqp://u:s1@a:5672/%2f, amqp://u:s2@b:5672/%2f"),
            "amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f"
        );
    }
}

/// Lets through at most `per_second` log lines a second and counts the rest, so a flood of bad
/// input cannot flood the logs (the metrics still count every event).
#[derive(Debug)]
pub struct LogLimit {
    per_second: u32,
    state: std::sync::Mutex<LimitState>,
}

#[derive(Debug)]
struct LimitState {
    window: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    /// A limit of `per_second` lines a second.
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: std::sync::Mutex::new(LimitState {
                window: std::time::Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when this line may be logged, `n` being how many were left out before it;
    /// `None` when it is to be left out.
    pub fn check(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.window.elapsed() >= std::time::Duration::from_secs(1) {
            state.window = std::time::Instant::now();
            state.logged = 0;
        }
        if state.logged < self.per_second {
            state.logged += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod limit_tests {
    use super::LogLimit;

    #[test]
    fn a_flood_is_cut_to_the_limit_and_the_rest_is_counted() {
        let limit = LogLimit::new(3);
        let allowed = (0..1000).filter(|_| limit.check().is_some()).count();
        assert_eq!(allowed, 3);
    }
}
