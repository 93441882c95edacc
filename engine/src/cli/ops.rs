//! The command line's operations pieces: `cairn purge`, the duration and time arguments of
//! `--retain-ended` and `--ended-before`, and the logging set-up (`--log-format`, and OTLP export
//! with the `otlp` feature).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::clock::SystemClock;
use crate::host::retention::{archive_file, purge_ended};
use crate::store::retention::PurgeFilter;
use crate::store::Store;

/// A length of time on the command line: a number and a unit, `s`, `m`, `h` or `d` (`90s`,
/// `30m`, `12h`, `7d`), or `0`.
///
/// # Errors
/// What is wrong with it, and what is accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not a duration: write a number and a unit, e.g. 90s, 30m, 12h, 7d")
    })?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use s, m, h or d (e.g. 7d), or 0"
            ))
        }
    };
    n.checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// A point in time on the command line: RFC 3339 (`2026-11-21T00:00:00Z`), or a duration
/// ([`parse_duration`]) meaning that long ago.
///
/// # Errors
/// What is wrong with it.
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(at.with_timezone(&Utc));
    }
    let ago = parse_duration(text).map_err(|_| {
        format!("{text:?} is neither a time (RFC 3339, e.g. 2026-11-21T00:00:00Z) nor a duration ago (e.g. 30d)")
    })?;
    let ago = chrono::Duration::from_std(ago).map_err(|e| e.to_string())?;
    Utc::now()
        .checked_sub_signed(ago)
        .ok_or_else(|| format!("{text:?} is too long ago"))
}

/// `cairn purge`: deletes (or, with `dry_run`, counts) the ended instances `filter` selects.
pub(super) async fn purge(
    store: &dyn Store,
    mut filter: PurgeFilter,
    archive: Option<PathBuf>,
    dry_run: bool,
) -> Result<(), CliError> {
    let what = match &filter.orchestration {
        Some(name) => format!("ended instances of {name:?}"),
        None => "ended instances".to_owned(),
    };
    if dry_run {
        let n = store.count_purgeable(&filter).await?;
        println!(
            "{n} {what} ended before {} would be purged (dry run: nothing deleted)",
            filter.ended_before
        );
        return Ok(());
    }
    if let Some(dir) = &archive {
        if !dir.is_dir() {
            return Err(CliError::NotFound(format!(
                "--archive {}: no such folder; create it first",
                dir.display()
            )));
        }
    }
    filter.limit = filter.limit.max(1);
    let clock: crate::clock::SharedClock = Arc::new(SystemClock);
    let totals = purge_ended(
        store,
        &filter,
        archive.as_deref(),
        &clock,
        Duration::from_millis(20),
        &CancellationToken::new(),
    )
    .await
    .map_err(|e| CliError::NotFound(e.to_string()))?;
    println!(
        "{} {what} ended before {} purged ({} rows)",
        totals.instances, filter.ended_before, totals.rows
    );
    if let Some(dir) = &archive {
        println!(
            "{} archived to {}",
            totals.archived,
            archive_file(dir, Utc::now()).display()
        );
    }
    Ok(())
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per event, with the fields of its spans (instance id, orchestration, ...).
    Json,
}

/// Sets up logging to stderr in `format` at `default_level` (or `RUST_LOG`); with the `otlp`
/// feature and `OTEL_EXPORTER_OTLP_ENDPOINT` set, also exports the spans of transitions and
/// persistence points through OTLP. Returns what must live as long as the program.
pub(super) fn init_logging(format: LogFormat, default_level: &str) -> Telemetry {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // A log line that cannot be written (stderr is a pipe whose reader has gone) is dropped.
    // Reporting it would write to stderr too, and panic in whatever thread logged: a host task,
    // or a database connection's worker thread, which would stop the host.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_filter(filter)
            .boxed(),
    };
    let (otlp, telemetry) = otlp_layer();
    let mut layers: Vec<BoxedLayer> = vec![fmt];
    layers.extend(otlp);
    tracing_subscriber::registry().with(layers).init();
    telemetry
}

/// What keeps the trace exporter running; dropping it flushes the spans left.
pub(super) struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: flushing the trace exporter failed: {e}");
            }
        }
    }
}

/// A layer of the subscriber.
type BoxedLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

#[cfg(not(feature = "otlp"))]
fn otlp_layer() -> (Option<BoxedLayer>, Telemetry) {
    (None, Telemetry {})
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set: a layer that exports the engine's spans (transitions,
/// persistence points, group commits: DEBUG level, whatever `RUST_LOG` says for the log lines)
/// through OTLP over HTTP.
#[cfg(feature = "otlp")]
fn otlp_layer() -> (Option<BoxedLayer>, Telemetry) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer;

    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
        return (None, Telemetry { provider: None });
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("warning: OTLP trace export is off: {e}");
            return (None, Telemetry { provider: None });
        }
    };
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("cairn")
                .build(),
        )
        .build();
    let tracer = provider.tracer("cairn");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(
            tracing_subscriber::filter::Targets::new().with_target("cairn", tracing::Level::DEBUG),
        )
        .boxed();
    (
        Some(layer),
        Telemetry {
            provider: Some(provider),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_operators_write_them() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("7").is_err());
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("d").is_err());
    }

    #[test]
    fn a_time_is_rfc_3339_or_a_duration_ago() {
        assert_eq!(
            parse_time("2026-11-21T00:00:00Z").map(|t| t.to_rfc3339()),
            Ok("2026-11-21T00:00:00+00:00".to_owned())
        );
        let ago = parse_time("1h").unwrap_or_default();
        let expected = Utc::now() - chrono::Duration::hours(1);
        assert!((ago - expected).num_seconds().abs() < 5);
        assert!(parse_time("yesterday").is_err());
    }
}
