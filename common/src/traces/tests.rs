use std::collections::HashMap;
use std::time::Duration;

use super::{Batching, RateLimited, Sampling, is_own_target, settings};

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

#[test]
fn traces_are_off_unless_an_endpoint_is_set() {
    assert_eq!(settings(env(&[])), Ok(None));
    assert_eq!(
        settings(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])),
        Ok(None)
    );
    assert_eq!(settings(env(&[("OTEL_SERVICE_NAME", "x")])), Ok(None));
    let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")];
    assert_eq!(settings(env(&on)), Ok(Some(Batching::default())));
    let traces_only = [(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "http://c:4318/v1/traces",
    )];
    assert_eq!(settings(env(&traces_only)), Ok(Some(Batching::default())));
    for off in [
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_TRACES_EXPORTER", "none"),
    ] {
        assert_eq!(settings(env(&[on[0], off])), Ok(None), "{off:?}");
    }
}

#[test]
fn unusable_settings_are_refused_by_name() {
    let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    for (bad, named) in [
        (
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift"),
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
        (("OTEL_TRACES_EXPORTER", "zipkin"), "OTEL_TRACES_EXPORTER"),
        (("OTEL_BSP_MAX_QUEUE_SIZE", "0"), "OTEL_BSP_MAX_QUEUE_SIZE"),
        (("OTEL_BSP_SCHEDULE_DELAY", "5s"), "OTEL_BSP_SCHEDULE_DELAY"),
    ] {
        let err = settings(env(&[on, bad])).expect_err(named);
        assert!(err.starts_with(named), "{err}");
    }
    for good in ["http/protobuf", "http/json"] {
        assert!(settings(env(&[on, ("OTEL_EXPORTER_OTLP_PROTOCOL", good)])).is_ok());
    }
}

#[test]
fn batching_follows_the_bsp_variables_and_a_batch_never_exceeds_the_queue() {
    let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    let got = settings(env(&[
        on,
        ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
        ("OTEL_BSP_SCHEDULE_DELAY", "250"),
    ]));
    assert_eq!(
        got,
        Ok(Some(Batching {
            max_queue: 100,
            max_batch: 100,
            delay: Duration::from_millis(250),
        }))
    );
}

#[test]
fn only_the_mesh_own_spans_are_exported() {
    for own in [
        "filter",
        "filter::server",
        "flowmesh_common::writers",
        "flowmesh_filter",
        "pg_writer::store",
        "mongo_writer",
        "generator::source",
    ] {
        assert!(is_own_target(own), "{own}");
    }
    for theirs in [
        "hyper::client",
        "reqwest::blocking",
        "h2",
        "lapin::channel",
        "filterx",
        "tower",
    ] {
        assert!(!is_own_target(theirs), "{theirs}");
    }
}

#[test]
fn the_sampler_follows_the_variables_and_defaults_to_a_rate_limit() {
    let sampler = |name: &str, arg: Option<&str>| {
        let mut pairs = vec![("OTEL_TRACES_SAMPLER", name)];
        pairs.extend(arg.map(|arg| ("OTEL_TRACES_SAMPLER_ARG", arg)));
        Sampling::from_env(env(&pairs))
    };
    assert_eq!(
        Sampling::from_env(env(&[])),
        Ok(Sampling::ParentBasedRateLimited(100.0))
    );
    assert_eq!(
        sampler(" ", Some("0.5")),
        Ok(Sampling::ParentBasedRateLimited(100.0))
    );
    for (name, arg, expected) in [
        ("always_on", None, Sampling::AlwaysOn),
        ("always_off", None, Sampling::AlwaysOff),
        ("traceidratio", Some("0.25"), Sampling::Ratio(0.25)),
        ("traceidratio", None, Sampling::Ratio(1.0)),
        ("parentbased_always_on", None, Sampling::ParentBasedAlwaysOn),
        (
            "parentbased_always_off",
            None,
            Sampling::ParentBasedAlwaysOff,
        ),
        (
            "parentbased_traceidratio",
            Some(" 0.01 "),
            Sampling::ParentBasedRatio(0.01),
        ),
        (
            "parentbased_ratelimiting",
            Some("2000"),
            Sampling::ParentBasedRateLimited(2000.0),
        ),
        (
            "parentbased_ratelimiting",
            Some("0"),
            Sampling::ParentBasedRateLimited(0.0),
        ),
    ] {
        assert_eq!(sampler(name, arg), Ok(expected), "{name} {arg:?}");
    }
    for (name, arg, named) in [
        ("jaeger_remote", None, "OTEL_TRACES_SAMPLER"),
        ("always-on", None, "OTEL_TRACES_SAMPLER"),
        ("traceidratio", Some("1.5"), "OTEL_TRACES_SAMPLER_ARG"),
        (
            "parentbased_traceidratio",
            Some("-0.1"),
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            "parentbased_ratelimiting",
            Some("fast"),
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            "parentbased_ratelimiting",
            Some("NaN"),
            "OTEL_TRACES_SAMPLER_ARG",
        ),
    ] {
        let err = sampler(name, arg).expect_err(name);
        assert!(err.starts_with(named), "{err}");
    }
}

/// Drives `sampling`'s sampler `roots` times with no parent, then once under a sampled and
/// once under an unsampled remote parent; returns how many roots were sampled and the two
/// children's decisions.
fn decide(sampling: Sampling, roots: usize) -> (usize, bool, bool) {
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::SamplingDecision;
    let sampler = sampling.sampler();
    let sampled = |cx: Option<&opentelemetry::Context>| {
        let result = sampler.should_sample(
            cx,
            TraceId::from_bytes(7u128.to_be_bytes()),
            "record",
            &SpanKind::Producer,
            &[],
            &[],
        );
        result.decision == SamplingDecision::RecordAndSample
    };
    let taken = (0..roots).filter(|_| sampled(None)).count();
    let parent = |flags| {
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(7u128.to_be_bytes()),
            SpanId::from_bytes(9u64.to_be_bytes()),
            flags,
            true,
            TraceState::default(),
        ))
    };
    let under_sampled = sampled(Some(&parent(TraceFlags::SAMPLED)));
    let under_unsampled = sampled(Some(&parent(TraceFlags::default())));
    (taken, under_sampled, under_unsampled)
}

#[test]
fn the_rate_limit_samples_a_seconds_worth_of_roots_at_once_and_then_as_time_earns_them() {
    let started = std::time::Instant::now();
    let (taken, under_sampled, under_unsampled) =
        decide(Sampling::ParentBasedRateLimited(100.0), 10_000);
    // A full bucket of 100, plus what the loop's own time earned at 100 a second.
    let earned = (started.elapsed().as_secs_f64() * 100.0).ceil() as usize;
    assert!(
        (100..=100 + earned).contains(&taken),
        "{taken} of 10 000 sampled, {earned} earned"
    );
    // A record's own decision (its traceparent) is followed whatever the bucket holds.
    assert!(under_sampled && !under_unsampled);
    assert_eq!(decide(Sampling::ParentBasedRateLimited(0.0), 50).0, 0);
    assert_eq!(decide(Sampling::ParentBasedAlwaysOn, 50), (50, true, false));
    assert_eq!(decide(Sampling::AlwaysOff, 50).0, 0);
}

#[test]
fn an_emptied_bucket_fills_again_at_the_rate() {
    let limited = RateLimited::new(1000.0);
    let sample = || {
        use opentelemetry::trace::{SpanKind, TraceId};
        use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample as _};
        limited
            .should_sample(
                None,
                TraceId::from_bytes(1u128.to_be_bytes()),
                "x",
                &SpanKind::Internal,
                &[],
                &[],
            )
            .decision
            == SamplingDecision::RecordAndSample
    };
    while sample() {}
    let drained = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(50));
    let refilled = std::iter::from_fn(|| sample().then_some(())).count();
    // At least the sleep's 50 ms at 1 000 a second; at most what the time since the bucket was
    // emptied earned (a second's worth at most).
    let earned = (drained.elapsed().as_secs_f64() * 1000.0).ceil() as usize;
    assert!(
        (50..=earned.min(1000) + 1).contains(&refilled),
        "{refilled} of {earned}"
    );
}
