//! Log lines on stderr: text for people (the default), or one JSON object a line
//! for log pipelines, where what a line concerns (plan, step, shard, tenant,
//! epoch) is a top-level field a query can select on.
use std::fmt;
use std::io::IsTerminal;

use clap::ValueEnum;
use serde_json::{Map, Value};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the process's subscriber; `filter` is used unless RUST_LOG is set.
pub fn init(filter: &str, format: LogFormat) {
    let given = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    // PostgreSQL's NOTICEs ("relation \"meta\" already exists, skipping" at every agent
    // start) are the server talking to itself: warnings and up only, unless asked for.
    let below_warn = matches!(given.trim(), "error" | "off");
    // The pool's own words while a server is away are said better by ours (the agent's
    // "shard down", the coordinator's "control store does not answer"): its ping of an
    // idle connection every few seconds (info), and its "slow acquire" warnings (a lane
    // waits for a connection on purpose while others run long steps), and the driver's
    // "slow statement" warning with the whole SQL for every step over a second (a
    // migration's steps are slow on purpose: during a game day they buried the lines that
    // mattered; a step's time is in its result and metrics).
    if !given.contains("sqlx") && !below_warn {
        for directive in [
            "sqlx::postgres::notice=warn",
            "sqlx_core::pool=warn",
            "sqlx::pool::acquire=error",
            "sqlx::query=error",
        ] {
            if let Ok(quiet) = directive.parse() {
                filter = filter.add_directive(quiet);
            }
        }
    }
    // Operator commands keep stdout for their output; logs go to stderr.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests calling in twice) keeps the first subscriber.
    let _ = match format {
        // Colours only for a person at a terminal; a file or a pipe gets plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .try_init(),
    };
}

/// One flat JSON object per event: timestamp, level, target, the event's fields
/// (`message` among them), and the fields of every span it happened in, the inner
/// span winning a name clash and the event over all. tracing-subscriber's own
/// JSON format nests span fields in a `spans` list, which log queries handle badly:
/// `plan` must be found at the same place whether the event or its span named it.
struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), Value::String(timestamp));
        let meta = event.metadata();
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_string()));
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                innermost = Some(span.name());
                let extensions = span.extensions();
                // JsonFields stores a span's fields as the text of a JSON object.
                if let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() {
                    line.extend(json_object(fields));
                }
            }
            if let Some(name) = innermost {
                line.insert("span".into(), Value::String(name.to_string()));
            }
        }
        let mut fields = String::new();
        ctx.format_fields(Writer::new(&mut fields), event)?;
        line.extend(json_object(&fields));
        writeln!(writer, "{}", Value::Object(line))
    }
}

fn json_object(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing::{info, info_span};
    use tracing_subscriber::fmt::format::JsonFields;

    use super::FlatJson;

    /// Lines written by the subscriber under test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn span_fields_are_flattened_beside_the_events_own() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let lane = info_span!(
                "lane",
                shard = "shard_0",
                plan = "p1",
                epoch = tracing::field::Empty
            );
            let _lane = lane.enter();
            // a field recorded after the span was made counts too
            lane.record("epoch", 7u64);
            let _run = info_span!("run", tenant = "tenant_0001", plan = "p2").entered();
            info!(step = "001_init", ms = 3u64, "step done");
            info!(plan = "p3", "the event's own field wins");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "one line per event: {text}");
        assert_eq!(lines[1]["plan"], "p3");
        let line = &lines[0];
        assert_eq!(line["message"], "step done");
        assert_eq!(line["step"], "001_init");
        assert_eq!(line["ms"], 3);
        assert_eq!(line["shard"], "shard_0");
        assert_eq!(line["tenant"], "tenant_0001");
        assert_eq!(line["epoch"], 7);
        // the inner span wins a clash
        assert_eq!(line["plan"], "p2");
        assert_eq!(line["span"], "run");
        assert_eq!(line["level"], "INFO");
        assert!(
            line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }
}
